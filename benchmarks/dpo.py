"""The DPO CPU demo, measured: does the cpu_demo preset raise held-out preference accuracy over the SFT model?

Pairs are built the way the on-policy stage builds them, in miniature: GSM8K training prompts (from row
``--skip`` on, past the SFT demo mix), the reference answer as ``chosen`` and a sample of the SFT model itself
(temperature ``--temperature``, at most ``--max-new-tokens`` tokens) as ``rejected``; ``--train`` pairs are
trained on, the next ``--heldout`` are held out. Then the reference log-probs are computed once
(`compute_reference_logprobs`, timed) and `run_dpo` trains with them (``--preset``, default cpu_demo).

Recorded: held-out metrics before (the SFT model) and after, the loss curve, timings and load averages (the
2-core machine is shared). Nothing is written under TULU_HOME; the checkpoint goes to a temporary directory.

    .venv/bin/python benchmarks/dpo.py [--model-dir .tulu/models/sft-<id>] [--out benchmarks/results/dpo.json]
"""

from __future__ import annotations

import argparse
import hashlib
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
from tulu_pipeline.progress import PrintReporter
from tulu_pipeline.templates.chat_template import apply_tulu_chat_template
from tulu_pipeline.training.dpo import run_dpo
from tulu_pipeline.training.dpo_reference import compute_reference_logprobs
from tulu_pipeline.training.dpo_config import dpo_config


def default_model_dir() -> Path:
    """The newest published SFT checkpoint under .tulu/models, else the converted base model."""
    models = Path(".tulu/models")
    finished = sorted((p for p in models.glob("sft-*") if (p / "training_manifest.json").exists()),
                      key=lambda p: (p / "training_manifest.json").stat().st_mtime)
    return finished[-1] if finished else models / "base_model"


def sample_answers(model_dir: Path, prompts: list[list[dict[str, str]]], max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 16) -> list[str]:
    """One sampled answer per prompt from the model (Tülu template, left-padded batches, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def build_pairs(model_dir: Path, n_train: int, n_heldout: int, skip: int, max_new_tokens: int,
                temperature: float, seed: int) -> list[dict[str, Any]]:
    rows = list(itertools.islice(iter_source_rows(get_source("gsm8k_train")), skip, skip + n_train + n_heldout))
    prompts = [row["messages"][:-1] for row in rows]
    samples = sample_answers(model_dir, prompts, max_new_tokens, temperature, seed)
    pairs = []
    for i, (row, prompt, sample) in enumerate(zip(rows, prompts, samples)):
        pairs.append({
            "pair_id": "pair-" + hashlib.sha256(f"{row['row_id']}|{sample}".encode()).hexdigest()[:16],
            "prompt_row_id": row["row_id"], "prompt": prompt, "chosen": row["messages"][-1]["content"],
            "rejected": sample or "I don't know.", "split": "train" if i < n_train else "heldout",
        })
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--preset", default="cpu_demo")
    parser.add_argument("--config", default="{}", help="JSON overrides of the preset")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--skip", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dpo.json"))
    args = parser.parse_args()
    model_dir = (args.model_dir or default_model_dir()).resolve()
    config = dpo_config(args.preset, **json.loads(args.config))
    load_start = os.getloadavg()

    started = time.perf_counter()
    pairs = build_pairs(model_dir, args.train, args.heldout, args.skip, args.max_new_tokens, args.temperature,
                        args.seed)
    sampling_s = time.perf_counter() - started
    train = [p for p in pairs if p["split"] == "train"]
    heldout = [p for p in pairs if p["split"] == "heldout"]
    started = time.perf_counter()
    reference = compute_reference_logprobs(pairs, model_dir, config)
    reference_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="tulu-dpo-bench-") as tmp:
        result = run_dpo(train, heldout, model_dir, Path(tmp) / "dpo", config, reference_logprobs=reference,
                         reporter=PrintReporter())
    m = result.metrics
    record = {
        "model_dir": str(model_dir), "preset": args.preset, "config": config.model_dump(mode="json"),
        "pairs": {"train": len(train), "heldout": len(heldout), "source": "gsm8k_train", "skip": args.skip,
                  "rejected": f"SFT-model samples, T={args.temperature}, <= {args.max_new_tokens} tokens"},
        "heldout_before": m["heldout_before"], "heldout_after": m["heldout_after"],
        "train_loss": m["train_loss"], "steps": m["steps"],
        "seconds": {"sampling": sampling_s, "reference_logprobs": reference_s, "train": m["train_s"],
                    "run_dpo_wall": m["wall_s"]},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), **result.manifest["versions"]},
        "sample_pair": {k: pairs[len(train)][k] for k in ("prompt", "chosen", "rejected")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    before, after = m["heldout_before"], m["heldout_after"]
    print(json.dumps({"event": "dpo_benchmark", "preference_accuracy": [before["preference_accuracy"],
                      after["preference_accuracy"]], "reward_accuracy_after": after["reward_accuracy"],
                      "mean_margin_after": after["mean_margin"], "seconds": record["seconds"]}))


if __name__ == "__main__":
    main()
