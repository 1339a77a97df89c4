"""Sharded SFT, DPO and GRPO updates on a tiny model, for tests/test_sharding.py: run under torchrun (FSDP, gloo)
or as a plain process (``--strategy none``, the one-rank reference on the same global batch).

    python -m torch.distributed.run --nproc-per-node 2 tests/sharding_driver.py --model-dir M --out O --strategy fsdp

Each method trains ``--steps`` optimizer steps on seeded random token batches that depend only on (seed, method,
step), so every world size sees the same global batch and a resumed run the same data. Each rank takes its slice of
the global batch; losses are normalised by the *global* count (tokens, pairs, loss tokens), times the world size
because FSDP averages gradients over ranks, so the update equals the one-rank update. Checkpoints every
``--save-every`` steps (sharded, `tulu_pipeline.training.sharding`); a run finds the newest complete one and resumes.
``--kill METHOD:STEP`` makes rank 1 SIGKILL itself while saving that step's checkpoint of that method (after its
shards are written, before the commit); torchrun then stops the other rank. Relaunched with the same ``--out``, each
method resumes from its newest complete checkpoint (a finished one resumes at its last step and only exports).
Rank 0 writes ``<out>/<method>/result.json`` (the last launch), appends each launch's resume point to
``<out>/<method>/launches.jsonl`` and exports ``<out>/<method>/export``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tulu_pipeline.training.dpo_losses import preference_loss
from tulu_pipeline.training.rlvr_rollouts import group_advantages
from tulu_pipeline.training.rlvr_step import grpo_loss
from tulu_pipeline.training.rlvr_config import RLVRTrainingConfig
from tulu_pipeline.training.sharding import (
    DataParallel,
    apply_sharding,
    clip_grad_norm,
    close_data_parallel,
    export_consolidated,
    init_data_parallel,
    latest_checkpoint,
    load_sharded_checkpoint,
    local_numel,
    optimizer_local_numel,
    remove_partial_checkpoints,
    save_sharded_checkpoint,
)
from tulu_pipeline.training.sharding_config import ShardingConfig

SFT_BATCH = 8  # sequences per global batch
DPO_BATCH = 4  # pairs
GRPO_PROMPTS, GRPO_GENERATIONS = 2, 4
GRPO_CONFIG = RLVRTrainingConfig(beta=0.05, loss_type="dapo", max_completion_length=8)
METHOD_IDS = {"sft": 1, "dpo": 2, "grpo": 3}


def batch_rng(seed: int, method: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + METHOD_IDS[method] * 10_007 + step)


def random_ids(gen: torch.Generator, low: int, high: int, vocab: int) -> list[int]:
    length = int(torch.randint(low, high + 1, (1,), generator=gen))
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
    return ids, attention


def token_logps(model: Any, prompts: list[list[int]], responses: list[list[int]], pad: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each response given its prompt ``[B, Lr]`` and their mask. The full forward goes
    through the root module, whose FSDP hooks gather the embeddings and the head."""
    ids, attention = padded([p + r for p, r in zip(prompts, responses)], pad)
    width = max(len(r) for r in responses)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)
    targets = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        positions[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        targets[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
    picked = torch.gather(logits.float(), 1, positions.to(device).unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    logps = torch.gather(torch.log_softmax(picked, -1), 2, targets.to(device).unsqueeze(-1)).squeeze(-1)
    mask = mask.to(device)
    return logps * mask, mask


def global_sum(value: torch.Tensor) -> float:
    value = value.detach().float().cpu().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
    return float(value)


def sft_step(model: Any, ref: Any, dp: DataParallel, gen: torch.Generator, vocab: int, pad: int) -> float:
    rows = [random_ids(gen, 8, 24, vocab) for _ in range(SFT_BATCH)]
    global_tokens = sum(len(r) - 1 for r in rows)
    mine = rows[dp.rank::dp.world_size]
    ids, attention = padded(mine, pad)
    labels = ids.masked_fill(attention == 0, -100)
    logits = model(input_ids=ids.to(dp.device), attention_mask=attention.to(dp.device), use_cache=False).logits
    summed = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                               labels[:, 1:].flatten().to(dp.device),
                                               ignore_index=-100, reduction="sum")
    (summed / global_tokens * dp.world_size).backward()
    return global_sum(summed) / global_tokens


def dpo_step(model: Any, ref: Any, dp: DataParallel, gen: torch.Generator, vocab: int, pad: int) -> float:
    pairs = [(random_ids(gen, 6, 10, vocab), random_ids(gen, 4, 10, vocab), random_ids(gen, 4, 10, vocab))
             for _ in range(DPO_BATCH)]
    mine = pairs[dp.rank::dp.world_size]
    prompts = [p for p, _, _ in mine] * 2
    responses = [c for _, c, _ in mine] + [r for _, _, r in mine]
    logps, mask = token_logps(model, prompts, responses, pad, dp.device)
    with torch.no_grad():
        ref_logps, _ = token_logps(ref, prompts, responses, pad, dp.device)
    n = len(mine)
    policy, reference, tokens = logps.sum(-1), ref_logps.sum(-1), mask.sum(-1)
    out = preference_loss("dpo_norm", policy[:n], policy[n:], tokens[:n], tokens[n:], reference[:n], reference[n:],
                          beta=0.1)
    out.loss.backward()  # a mean over this rank's pairs; FSDP's average over equal shares is the global mean
    return global_sum(out.losses.sum()) / DPO_BATCH


def grpo_step(model: Any, ref: Any, dp: DataParallel, gen: torch.Generator, vocab: int, pad: int) -> float:
    """One GRPO update on seeded rollouts: G completions per prompt, rewards from a fixed rule (share of even
    token ids), group-normalised advantages, the project's clipped-ratio + k3 KL loss (`grpo_loss`)."""
    prompts = [random_ids(gen, 6, 10, vocab) for _ in range(GRPO_PROMPTS)]
    rollouts = [(p, random_ids(gen, 3, GRPO_CONFIG.max_completion_length, vocab))
                for p in prompts for _ in range(GRPO_GENERATIONS)]
    rewards = [sum(t % 2 == 0 for t in c) / len(c) for _, c in rollouts]
    advantages = [a for g in range(GRPO_PROMPTS)
                  for a in group_advantages(rewards[g * GRPO_GENERATIONS:(g + 1) * GRPO_GENERATIONS])]
    loss_tokens = sum(len(c) for _, c in rollouts)
    mine = list(range(dp.rank, len(rollouts), dp.world_size))
    prompts_mine, completions = [rollouts[i][0] for i in mine], [rollouts[i][1] for i in mine]
    logps, mask = token_logps(model, prompts_mine, completions, pad, dp.device)
    with torch.no_grad():
        ref_logps, _ = token_logps(ref, prompts_mine, completions, pad, dp.device)
    terms = grpo_loss(logps, logps.detach(), torch.tensor([advantages[i] for i in mine], device=dp.device), mask,
                      GRPO_CONFIG, num_sequences=len(rollouts), num_tokens=loss_tokens, ref_logps=ref_logps)
    (terms.loss * dp.world_size).backward()
    return global_sum(terms.loss)


STEPS = {"sft": sft_step, "dpo": dpo_step, "grpo": grpo_step}


def load_model(model_dir: Path, args: argparse.Namespace, dp: DataParallel, trainable: bool) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(trainable)
    model.requires_grad_(trainable)
    config = ShardingConfig(strategy=args.strategy, mixed_precision=args.mixed_precision,
                            activation_checkpointing=args.activation_checkpointing and trainable,
                            cpu_offload=args.cpu_offload)
    return apply_sharding(model, config, dp)


def gathered(value: Any, dp: DataParallel) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dp.world_size
    dist.all_gather_object(values, value)
    return values


def run_method(method: str, args: argparse.Namespace, dp: DataParallel, kill_step: int | None) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = load_model(args.model_dir, args, dp, trainable=True)
    ref = load_model(args.model_dir, args, dp, trainable=False) if method != "sft" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / 2))
    root = args.out / method
    removed = remove_partial_checkpoints(root / "checkpoints", dp)
    start, losses, norms = 0, [], []
    resume = latest_checkpoint(root / "checkpoints")
    if resume is not None:
        start, extra = load_sharded_checkpoint(resume, model, optimizer, dp)
        scheduler.load_state_dict(extra["scheduler"])
        losses, norms = extra["losses"], extra["grad_norms"]
    vocab, pad = model.config.vocab_size, tokenizer.pad_token_id or 0
    for step in range(start + 1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        losses.append(STEPS[method](model, ref, dp, batch_rng(args.seed, method, step), vocab, pad))
        norms.append(clip_grad_norm(model, 1.0))
        optimizer.step()
        scheduler.step()
        if step % args.save_every == 0 or step == args.steps:
            die = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if step == kill_step and dp.rank == 1 else None
            save_sharded_checkpoint(root / "checkpoints", step, model, optimizer, dp, on_written=die,
                                    extra={"scheduler": scheduler.state_dict(), "losses": losses, "grad_norms": norms})
    if dp.is_main:
        with open(root / "launches.jsonl", "a") as log:
            log.write(json.dumps({"resumed_from": start if resume is not None else None,
                                  "removed_partials": removed}) + "\n")
    params = gathered(local_numel(model), dp)
    optim = gathered(optimizer_local_numel(optimizer), dp)
    export_consolidated(model, tokenizer, root / "export", dp)
    if dp.is_main:
        result = {"method": method, "strategy": args.strategy, "world_size": dp.world_size,
                  "mixed_precision": args.mixed_precision, "activation_checkpointing": args.activation_checkpointing,
                  "cpu_offload": args.cpu_offload, "losses": losses, "grad_norms": norms,
                  "resumed_from": start if resume is not None else None, "removed_partials": removed,
                  "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", None)
                                                or getattr(model, "is_gradient_checkpointing", False)),
                  "master_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "optimizer_dtypes": sorted({str(v.dtype) for state in optimizer.state.values()
                                              for v in state.values() if hasattr(v, "dim") and v.dim() > 0}),
                  "param_numel": [list(p) for p in params], "optimizer_numel": [list(o) for o in optim]}
        (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="sft,dpo,grpo")
    parser.add_argument("--strategy", choices=("none", "fsdp"), default="fsdp")
    parser.add_argument("--mixed-precision", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill", default=None, help="METHOD:STEP: rank 1 SIGKILLs itself mid-save at that step")
    args = parser.parse_args()
    kill_method, _, kill_step = (args.kill or ":").partition(":")
    dp = init_data_parallel("cpu")
    try:
        for method in args.methods.split(","):
            run_method(method, args, dp, int(kill_step) if method == kill_method else None)
    finally:
        close_data_parallel()


if __name__ == "__main__":
    main()
