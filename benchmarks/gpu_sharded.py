"""Sharded SFT and DPO throughput on one GPU: SmolLM2-135M shapes, FSDP2 + bf16 (tulu_pipeline.training.sharding),
with and without activation checkpointing; tokens/s, MFU and peak CUDA memory per mode, as JSON.

    python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/gpu_sharded.py --out $OUT/gpu.json

Weights are random (throughput depends on shapes, not values) and batches are random token ids, so nothing but
this checkout travels. The model is SmolLM2-135M's shape (``SMOLLM2_135M``: the config of the embedded GGUF that
models/base_model converts; ``--config DIR`` reads a config.json instead). Every mode builds a fresh model, runs
``--warmup`` untimed then ``--steps`` timed optimizer steps of ``--micro-batch`` x ``--seq`` tokens:

- SFT: causal-LM loss over every token (rows are full, as packed rows are); model FLOPs 6·N per token.
- DPO: ``--micro-batch``/2 pairs, prompt and response half a row each, chosen and rejected in one batch, the
  project's ``dpo_norm`` loss (training/dpo_losses.py); a frozen sharded reference runs forward only, so model FLOPs
  are 6·N (policy) + 2·N (reference) per token.

N counts every parameter once (the tied embedding is the LM head's matmul). MFU = model FLOPs/s over the bf16 dense
peak (``--peak-tflops``, 989 for an H200 SXM); activation checkpointing's recomputation is not counted (model FLOPs,
not hardware FLOPs). ``mfu_with_attention`` adds the attention score/value matmuls, 12·layers·hidden·seq per token.

Imports only torch, transformers and numpy (no pydantic, trl, datasets or dagster-pipes: the GPU image lacks them).
``--device cpu --tiny --steps 1`` is the CPU smoke mode that tests/test_gpu_sharded_smoke.py runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tulu_pipeline.training.dpo_losses import preference_loss  # noqa: E402
from tulu_pipeline.training.sharding import (  # noqa: E402
    DataParallel,
    close_data_parallel,
    init_data_parallel,
    local_numel,
    shard_model,
)

H200_BF16_DENSE_TFLOPS = 989.0
# SmolLM2-135M(-Instruct): the config transformers reads from the embedded GGUF (tulu_pipeline.models.base_model).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


def model_config(args: argparse.Namespace) -> Any:
    from transformers import AutoConfig, LlamaConfig

    if args.config is not None:
        return AutoConfig.from_pretrained(args.config)
    shape = dict(TINY if args.tiny else SMOLLM2_135M)
    rope_theta = shape.pop("rope_theta", 10000.0)
    config = LlamaConfig(**shape)
    # transformers 5 keeps rope settings in rope_parameters (older 4.x: rope_theta); set whichever this one has.
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = rope_theta
    else:
        config.rope_theta = rope_theta
    return config


def build(config: Any, dp: DataParallel, activation_checkpointing: bool, trainable: bool = True) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train(trainable)
    model.requires_grad_(trainable)
    return shard_model(model, dp, mixed_precision="bf16" if dp.device.type == "cuda" else "fp32",
                       activation_checkpointing=activation_checkpointing and trainable)


def sft_loss(model: Any, ids: Any) -> Any:
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def dpo_loss(model: Any, ref: Any, ids: Any) -> Any:
    """Rows 0..B/2-1 are chosen, the rest rejected, for the same prompts (the first half of every row)."""
    import torch

    half = ids.size(1) // 2

    def response_logps(policy: Any) -> Any:
        logits = policy(input_ids=ids, use_cache=False).logits[:, half - 1:-1].float()
        return torch.gather(torch.log_softmax(logits, -1), 2, ids[:, half:].unsqueeze(-1)).squeeze(-1).sum(-1)

    logps = response_logps(model)
    with torch.no_grad():
        ref_logps = response_logps(ref)
    n = ids.size(0) // 2
    tokens = torch.full((n,), float(ids.size(1) - half), device=ids.device)
    return preference_loss("dpo_norm", logps[:n], logps[n:], tokens, tokens, ref_logps[:n], ref_logps[n:],
                           beta=0.1).loss


def batch(method: str, step: int, args: argparse.Namespace, vocab: int, device: Any) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (args.micro_batch, args.seq), generator=gen)
    if method == "dpo":  # chosen and rejected share the prompt (the first half)
        n = args.micro_batch // 2
        ids[n:, : args.seq // 2] = ids[:n, : args.seq // 2]
    return ids.to(device)


def run_mode(method: str, activation_checkpointing: bool, config: Any, dp: DataParallel,
             args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = dp.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(config, dp, activation_checkpointing)
    ref = build(config, dp, False, trainable=False) if method == "dpo" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n_params = local_numel(model)[1]
    losses, started = [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        ids = batch(method, step, args, config.vocab_size, dp.device)
        loss = sft_loss(model, ids) if method == "sft" else dpo_loss(model, ref, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = args.steps * args.micro_batch * args.seq
    tokens_per_s = tokens / seconds
    flops_per_token = (6 if method == "sft" else 8) * n_params
    passes = 3 if method == "sft" else 4  # fwd+bwd = 3 forward-equivalents; DPO adds the reference forward
    attention_per_token = passes * 4 * config.num_hidden_layers * config.hidden_size * args.seq
    peak = args.peak_tflops * 1e12
    result = {
        "method": method, "activation_checkpointing": activation_checkpointing, "parameters": n_params,
        "micro_batch": args.micro_batch, "seq": args.seq, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "timed_s": seconds, "tokens_per_s": tokens_per_s, "step_s": seconds / args.steps,
        "model_flops_per_token": flops_per_token, "mfu": flops_per_token * tokens_per_s / peak,
        "mfu_with_attention": (flops_per_token + attention_per_token) * tokens_per_s / peak,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    del model, ref, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--config", type=Path, default=None, help="a model directory with config.json")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--modes", default="sft,sft+ac,dpo,dpo+ac")
    args = parser.parse_args()
    if args.micro_batch % 2:
        parser.error("--micro-batch must be even (DPO pairs)")

    import torch
    import transformers

    dp = init_data_parallel(args.device)
    config = model_config(args)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dp.device) if dp.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "world_size": dp.world_size, "sharding": "fsdp2 (fully_shard per decoder layer + root)",
        "mixed_precision": "bf16 params/compute, fp32 master weights, reduction and AdamW state"
        if dp.device.type == "cuda" else "fp32", "peak_tflops": args.peak_tflops,
        "model": "random weights, " + ("tiny 2-layer Llama" if args.tiny else str(args.config or "SmolLM2-135M shape")),
        "modes": [],
    }
    try:
        for mode in args.modes.split(","):
            method, _, ac = mode.partition("+")
            result = run_mode(method, ac == "ac", config, dp, args)
            report["modes"].append(result)
            if dp.is_main:
                print(f"{mode:8s} {result['tokens_per_s']:>10.0f} tok/s  MFU {result['mfu']:.3f}  "
                      f"peak {result['peak_memory_gib'] or 0:.2f} GiB  loss {result['loss_first']:.3f}"
                      f"->{result['loss_last']:.3f}", flush=True)
    finally:
        if dp.is_main:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, args.out)
        close_data_parallel()


if __name__ == "__main__":
    main()
