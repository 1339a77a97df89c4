"""SFT throughput: packed padding-free micro-batches against padded ones, same run, same data, interleaved.

Model: the embedded SmolLM2-135M-Instruct (converted once into ``--base-model-dir``), loaded as `run_sft`
loads it (sdpa attention, bf16 autocast where the CPU has native bf16, TRL's fused LM-head loss). Data: the
CPU demo mix built from the bundle (150 gsm8k_train + 60 code_alpaca + 40 self_instruct_seed rows),
shuffled with seed 0 and cut into micro-batches of 8 conversations (the cpu_demo preset's batch).

Every micro-batch is collated three ways and each runs forward + backward on the same weights, the modes
interleaved (their order rotating) so that load from other processes hits them alike:

- ``padded``: one row per conversation, right-padded to the longest, with an attention mask;
- ``packed``: `SFTCollator` rows of at most ``max_length`` (512) tokens, per-sequence position ids (what
  `run_sft` uses on CPU);
- ``packed_single_row``: everything in one row (TRL's padding-free layout, meant for flash-attention), to
  show the cost of a dense block-diagonal mask over a long row with sdpa.

Reported per mode: ``tokens_per_s`` (real, non-padding tokens per second of forward+backward),
``packing_efficiency`` (real tokens / token positions computed) and the mean loss, which must agree across
modes (same sequences, attention never crosses a sequence boundary). The first micro-batch is a warm-up and
not counted. Ratios are over ``padded``. ``--demo`` also runs the full CPU demo end to end through `run_sft`
(cpu_demo preset, 32 held-out rows) and records wall time and losses. Load averages are recorded: the
2-core machine is shared.

    .venv/bin/python benchmarks/sft.py [--batches 6] [--demo] [--out benchmarks/results/sft.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.models.base_model import prepare_base_model
from tulu_pipeline.training.sft_config import sft_config
from tulu_pipeline.training.checkpointing import load_training_model, resolve_bf16
from tulu_pipeline.training.sft import run_sft

MIX = [("gsm8k_train", 150, 19), ("code_alpaca", 60, 8), ("self_instruct_seed", 40, 5)]


def demo_mix() -> tuple[list[dict], list[dict]]:
    """The CPU demo mix (250 rows) and its 32 held-out rows (the next rows of each source)."""
    train, heldout = [], []
    for source, n_train, n_heldout in MIX:
        rows = list(itertools.islice(iter_source_rows(get_source(source)), n_train + n_heldout))
        train += rows[:n_train]
        heldout += rows[n_train:]
    return train, heldout


MODES = {"padded": (False, "max_length"), "packed": (True, "max_length"), "packed_single_row": (True, None)}


def measure_modes(base: Path, train: list[dict], batches: int) -> dict[str, dict[str, Any]]:
    """Forward + backward of each micro-batch in every mode, interleaved; see the module docstring."""
    import random

    import torch
    from transformers import AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from tulu_pipeline.training.batching import INFO_KEYS, SFTCollator
    from tulu_pipeline.templates.chat_template import (
        apply_tulu_chat_template,
        encode_rows,
    )

    config = sft_config("cpu_demo")
    bf16 = resolve_bf16(config)
    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(base))
    examples = encode_rows(train, tokenizer, config.max_length).examples
    random.Random(0).shuffle(examples)
    size = config.per_device_batch_size
    micro_batches = [examples[i * size:(i + 1) * size] for i in range(batches + 1)]
    model = load_training_model(base, config)
    add_fused_lm_head(model)
    model.train()
    collators = {name: SFTCollator(tokenizer.pad_token_id, packing=packing,
                                   max_row_tokens=config.max_length if cap == "max_length" else None)
                 for name, (packing, cap) in MODES.items()}
    totals = {name: {"real": 0, "computed": 0, "seconds": 0.0, "nll": 0.0, "trained": 0} for name in MODES}
    names = list(MODES)
    for index, micro_batch in enumerate(micro_batches):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            batch = collators[name](micro_batch)
            info = {key: batch.pop(key) for key in INFO_KEYS if key in batch}
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(**batch, fused_lm_head=True, use_cache=False)
            nll = -out.log_probs.float().sum()
            trained = int(out.label_mask.sum())
            (nll / trained).backward()
            seconds = time.perf_counter() - started
            model.zero_grad(set_to_none=True)
            if index == 0:
                continue  # warm-up
            t = totals[name]
            t["real"] += int(info["real_tokens"])
            t["computed"] += int(info["computed_tokens"])
            t["seconds"] += seconds
            t["nll"] += float(nll.detach())
            t["trained"] += trained
    return {
        name: {
            "real_tokens": t["real"],
            "computed_tokens": t["computed"],
            "seconds": round(t["seconds"], 2),
            "tokens_per_s": round(t["real"] / t["seconds"], 1),
            "packing_efficiency": round(t["real"] / t["computed"], 4),
            "mean_loss": round(t["nll"] / t["trained"], 5),
        }
        for name, t in totals.items()
    }


def run_demo(base: Path, train: list[dict], heldout: list[dict], work: Path) -> dict[str, Any]:
    config = sft_config("cpu_demo")
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = run_sft(train, heldout, base, work / "demo", config)
    m = result.metrics
    losses = [p["loss"] for p in m["train_loss"]]
    return {
        "config": config.model_dump(mode="json"),
        "wall_s": round(time.perf_counter() - started, 1),
        "train_s": round(m["train_s"], 1),
        "train_loss_first_3": round(sum(losses[:3]) / 3, 4),
        "train_loss_last_3": round(sum(losses[-3:]) / 3, 4),
        "heldout_loss_before": round(m["heldout_loss_before"], 4),
        "heldout_loss_after": round(m["heldout_loss_after"], 4),
        "tokens": m["tokens"],
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "packing_efficiency": round(m["packing_efficiency"], 4),
        "steps": m["steps"],
        "trained_rows_seen": m["trained_rows_seen"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6, help="measured micro-batches of 8 conversations per mode")
    parser.add_argument("--demo", action="store_true", help="also run the full CPU demo end to end")
    parser.add_argument("--base-model-dir", type=Path, default=Path(tempfile.gettempdir()) / "tulu-bench-base-model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sft.json")
    args = parser.parse_args()

    prepare_base_model(args.base_model_dir)
    train, heldout = demo_mix()
    load_before = os.getloadavg()
    modes = measure_modes(args.base_model_dir, train, args.batches)
    load_after_modes = os.getloadavg()
    demo = None
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="tulu-bench-sft-") as tmp:
            demo = run_demo(args.base_model_dir, train, heldout, Path(tmp))
    padded = modes["padded"]
    payload: dict[str, Any] = {
        "benchmark": "sft",
        "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32 weights), sdpa attention",
        "data": {"train_rows": len(train), "heldout_rows": len(heldout), "mix": MIX,
                 "measured_micro_batches": args.batches, "conversations_per_micro_batch": 8},
        "bf16_autocast": resolve_bf16(sft_config("cpu_demo")),
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after_modes]},
        "modes": modes,
        "ratios_over_padded": {
            name: {"tokens_per_s": round(m["tokens_per_s"] / padded["tokens_per_s"], 3),
                   "packing_efficiency": round(m["packing_efficiency"] / padded["packing_efficiency"], 3)}
            for name, m in modes.items() if name != "padded"
        },
    }
    if demo is not None:
        payload["cpu_demo"] = demo
    write_atomic(args.out, payload)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
