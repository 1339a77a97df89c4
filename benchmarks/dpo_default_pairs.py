"""DPO on the default run's own pairs, one run per config: which learning rate moves held-out preference?

Reads the latest ``preference_pairs`` (its train / held-out split) and ``reference_logprobs`` of a TULU_HOME
filled by ``make run`` (the verified GSM8K pairs: reference answer against the SFT checkpoint's own wrong sample)
and the SFT checkpoint they were sampled from, then runs `run_dpo` once per ``--config`` (JSON overrides of
the preset) into a temporary directory. Recorded per config: held-out metrics before and after, their paired
effect (`heldout_effect`: Δ, bootstrap interval, sign test), steps and seconds. Every config runs in this one
process on the same pairs, so their times compare as ratios; nothing is written under TULU_HOME.

    .venv/bin/python benchmarks/dpo_default_pairs.py --home .tulu \\
        --config '{"learning_rate": 1e-5}' --config '{"learning_rate": 5e-5}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tulu_pipeline.preference.schema import PAIRS_DATASET
from tulu_pipeline.storage import Store
from tulu_pipeline.training.dpo import run_dpo
from tulu_pipeline.training.dpo_config import dpo_config
from tulu_pipeline.training.dpo_job import load_pairs
from tulu_pipeline.training.dpo_reference import REFERENCE_DATASET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, default=Path(".tulu"))
    parser.add_argument("--preset", default="cpu_demo")
    parser.add_argument("--config", action="append", default=None, help="JSON overrides of the preset (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dpo_default_pairs.json"))
    args = parser.parse_args()
    store = Store(str(args.home.resolve()))
    pairs_version = store.latest_version(PAIRS_DATASET)
    train, heldout = load_pairs(store, {"pairs_version": pairs_version})
    reference_version = store.latest_version(REFERENCE_DATASET)
    reference = list(store.iter_rows(REFERENCE_DATASET, reference_version))
    sft = sorted({p["rejected_model"] for p in train + heldout if p["rejected_model"].startswith("sft-")})
    if len(sft) != 1:
        raise SystemExit(f"{PAIRS_DATASET}@{pairs_version}: expected the samples of one SFT checkpoint, got {sft}")
    model_dir = Path(store.path("models", sft[0]))
    runs = []
    for overrides in args.config or ["{}"]:
        config = dpo_config(args.preset, **json.loads(overrides))
        load_start = os.getloadavg()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tulu-dpo-pairs-") as tmp:
            result = run_dpo(train, heldout, model_dir, Path(tmp) / "dpo", config, reference_logprobs=reference)
        m = result.metrics
        runs.append({"overrides": json.loads(overrides), "steps": m["steps"],
                     "heldout_before": m["heldout_before"], "heldout_after": m["heldout_after"],
                     "heldout_effect": m["heldout_effect"],
                     "seconds": {"run_dpo_wall": time.perf_counter() - started, "train": m["train_s"]},
                     "load_average": {"start": load_start, "end": os.getloadavg()}})
        effect = m["heldout_effect"]["preference_accuracy"]
        print(json.dumps({"overrides": json.loads(overrides), "preference_accuracy": [
            m["heldout_before"]["preference_accuracy"], m["heldout_after"]["preference_accuracy"]],
            "delta": effect["delta"], "ci": [effect["ci_low"], effect["ci_high"]], "p": effect["p_value"]}))
    base = runs[0]["seconds"]["run_dpo_wall"]
    for run in runs:
        run["seconds"]["ratio_to_first"] = run["seconds"]["run_dpo_wall"] / base
    record = {"home": str(args.home), "preset": args.preset, "sft_checkpoint": sft[0],
              "pairs": {"version": pairs_version, "train": len(train), "heldout": len(heldout)},
              "reference_logprobs_version": reference_version, "runs": runs,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          **result.manifest["versions"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
