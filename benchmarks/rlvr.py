"""The RLVR CPU demo, measured: does the cpu_demo preset raise the verifiable reward on held-out prompts?

Prompts are built the way `rlvr_prompts` builds its ``cpu_demo`` set, in miniature: short prompts of the curated
instruction sources (``RLVR_PRESETS["cpu_demo"].if_sources``) with one IFEval-taxonomy constraint each, drawn by
`sample_constraints` with the preset's constraint types and word limit; ``--train`` prompts are trained on, the
next ``--heldout`` are held out. `run_rlvr` then trains the start model with the ``--preset`` GRPO config and
measures the held-out prompts greedily before and after (verifier accuracy, with seeded bootstrap 95% intervals;
the change is paired: the same prompts, answered by both checkpoints).

Recorded: the config, held-out accuracy before/after with intervals, the per-step metrics, timings and load
averages (the 2-core machine is shared). Nothing is written under TULU_HOME; the checkpoint goes to a temporary
directory.

    .venv/bin/python benchmarks/rlvr.py [--model-dir .tulu/models/dpo-<id>] [--out benchmarks/results/rlvr.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.progress import PrintReporter
from tulu_pipeline.rewards.constraints import sample_constraints
from tulu_pipeline.rlvr.prompts import RLVR_PRESETS, if_row
from tulu_pipeline.training.checkpointing import write_json_atomic
from tulu_pipeline.training.rlvr import run_rlvr
from tulu_pipeline.training.rlvr_config import rlvr_training_config


def default_model_dir() -> Path:
    """The newest published DPO checkpoint under .tulu/models (RLVR's start in `make run`), else SFT, else the
    converted base model."""
    models = Path(".tulu/models")
    for kind in ("dpo", "sft"):
        finished = sorted((p for p in models.glob(f"{kind}-*") if (p / "training_manifest.json").exists()),
                          key=lambda p: (p / "training_manifest.json").stat().st_mtime)
        if finished:
            return finished[-1]
    return models / "base_model"


def constraint_rows(n: int, seed: int, max_chars: int) -> list[dict[str, Any]]:
    """``n`` RLVR rows: short curated prompts with one constraint of the cpu_demo kind each (seeded)."""
    preset = RLVR_PRESETS["cpu_demo"]
    parents = []
    for source in preset.if_sources:
        for row in iter_source_rows(get_source(source)):
            users = [m["content"] for m in row["messages"] if m["role"] == "user"]
            if users and len(users[0]) <= max_chars:
                parents.append((row, users[0]))
    random.Random(seed).shuffle(parents)
    rows = []
    for row, prompt in parents[:n]:
        rng = random.Random(f"{seed}:{row['row_id']}")
        sampled = sample_constraints(rng, k=preset.constraints_per_prompt, types=preset.if_instruction_types,
                                     word_limit=preset.if_word_limit)
        rows.append(if_row(row, prompt, "train", sampled))
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} curated prompts of at most {max_chars} characters; asked for {n}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--preset", default="cpu_demo")
    parser.add_argument("--set", default="{}", help="JSON object of RLVRTrainingConfig overrides")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--max-prompt-chars", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--note", default="", help="recorded with the results")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rlvr.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model_dir = (args.model_dir or default_model_dir()).resolve()
    config = rlvr_training_config(args.preset, **json.loads(args.set))
    rows = constraint_rows(args.train + args.heldout, args.seed, args.max_prompt_chars)
    train, heldout = rows[: args.train], rows[args.train :]
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_rlvr(train, heldout, model_dir, Path(tmp) / "rlvr", config, reporter=PrintReporter())
    wall = time.perf_counter() - started
    m = result.metrics
    before, after = m["heldout_before"], m["heldout_after"]
    out = {
        "what": "RLVR (GRPO) cpu_demo: on held-out constraint prompts, before and after training, the training "
                "reward of sampled answers (paired per prompt) and the verifier accuracy of greedy answers",
        "command": " ".join(["python", *sys.argv]),
        "note": args.note,
        "start_model": str(model_dir),
        "start_model_kind": model_dir.name.split("-")[0],
        "preset": args.preset,
        "config": config.model_dump(mode="json"),
        "prompts": {"train": len(train), "heldout": len(heldout), "seed": args.seed,
                    "constraint_types": list(RLVR_PRESETS["cpu_demo"].if_instruction_types or []),
                    "word_limit": list(RLVR_PRESETS["cpu_demo"].if_word_limit or [])},
        "heldout_accuracy_before": before["accuracy"],
        "heldout_accuracy_before_ci95": before["accuracy_ci95"],
        "heldout_accuracy_after": after["accuracy"],
        "heldout_accuracy_after_ci95": after["accuracy_ci95"],
        "heldout_accuracy_change": after["accuracy"] - before["accuracy"],
        "heldout_accuracy_change_ci95": m["heldout_accuracy_change_ci95"],
        "heldout_mean_reward_before": before["mean_score"],
        "heldout_mean_reward_after": after["mean_score"],
        "heldout_samples_per_prompt": config.heldout_samples,
        "heldout_sampled_reward_before": m.get("heldout_reward_before"),
        "heldout_sampled_reward_before_ci95": before.get("sampled_reward_ci95"),
        "heldout_sampled_reward_after": m.get("heldout_reward_after"),
        "heldout_sampled_reward_after_ci95": after.get("sampled_reward_ci95"),
        "heldout_sampled_reward_change": m.get("heldout_reward_change"),
        "heldout_sampled_reward_change_ci95": m.get("heldout_reward_change_ci95"),
        "heldout_sampled_accuracy_before": before.get("sampled_accuracy"),
        "heldout_sampled_accuracy_after": after.get("sampled_accuracy"),
        "heldout_sampled_unfinished_before": before.get("sampled_unfinished_rate"),
        "heldout_sampled_unfinished_after": after.get("sampled_unfinished_rate"),
        "train_reward_first_steps": m["reward_first_steps"],
        "train_reward_last_steps": m["reward_last_steps"],
        "per_step": m["reward_per_step"],
        "samples": m["samples"],
        "train_s": m["train_s"],
        "wall_s": wall,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    write_json_atomic(args.out, out)
    print(json.dumps({k: out[k] for k in ("heldout_accuracy_before", "heldout_accuracy_before_ci95",
                                          "heldout_accuracy_after", "heldout_accuracy_after_ci95",
                                          "heldout_accuracy_change_ci95", "heldout_sampled_reward_before",
                                          "heldout_sampled_reward_after", "heldout_sampled_reward_change_ci95",
                                          "wall_s")}))


if __name__ == "__main__":
    main()
