"""GPU proof of the trainer entrypoint: `run_sft` on CUDA with SmolLM2-135M's exact shapes, and the
transformers generation backend on CUDA (batched vs one prompt at a time, via benchmarks/generation.py).

The converted SmolLM2 weights (517 MB) cannot travel to the GPU machine (64 MiB per call), so the model is
random-initialized from SmolLM2-135M's config with its real tokenizer: throughput depends on shapes, not
weights. Rows: the CPU demo's SFT mix, exported to JSONL. Packed (padding-free) and padded batches are
measured in the same run, so the ratio is comparable across machines.

    python3 benchmarks/gpu_check.py --tok .gpu/tok --rows .gpu/rows.jsonl --out $OUT

Status: checked on CPU only (``--steps 2``); it has not run on a GPU yet (the device time of the session that
wrote it went to the generation benchmark). ``.gpu/`` holds the tokenizer files of models/base_model and the
mix exported as JSONL; the GPU image lacks trl, datasets, pydantic and dagster-pipes, which travel as wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def random_smollm2(tok: Path, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tok)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tok).save_pretrained(target)
    for extra in ("chat_template.jinja",):
        if (tok / extra).exists():
            (target / extra).write_bytes((tok / extra).read_bytes())
    return target


def sft_run(base: Path, rows: list[dict], out: Path, packing: bool, steps: int, batch: int) -> dict:
    from tulu_pipeline.training.sft_config import sft_config
    from tulu_pipeline.progress import NullReporter
    from tulu_pipeline.training.sft import run_sft

    config = sft_config("cpu_demo", max_steps=steps, per_device_batch_size=batch, packing=packing,
                        save_steps=10_000, logging_steps=min(5, steps), num_epochs=20.0)
    train, heldout = rows[:-32], rows[-32:]
    started = time.perf_counter()
    result = run_sft(train, heldout, base, out, config, reporter=NullReporter())
    metrics = {k: v for k, v in result.metrics.items() if not isinstance(v, list)}
    return {"packing": packing, "steps": steps, "per_device_batch_size": batch, "wall_s": time.perf_counter() - started,
            **{k: metrics.get(k) for k in ("tokens_per_s", "tokens", "train_s", "initial_loss", "final_loss",
                                           "heldout_loss_before", "heldout_loss_after", "packing_efficiency")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tok", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import torch
    import transformers

    report: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (cpu)", "torch": torch.__version__,
                    "transformers": transformers.__version__, "cuda": torch.version.cuda,
                    "model": "random weights, SmolLM2-135M-Instruct config and tokenizer"}
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        base = random_smollm2(args.tok, Path(tmp) / "base")
        report["sft"] = [sft_run(base, rows, Path(tmp) / f"ckpt-{mode}", mode == "packed", args.steps, args.batch)
                         for mode in ("packed", "padded")]
        packed, padded = report["sft"]
        if packed["tokens_per_s"] and padded["tokens_per_s"]:
            report["sft_packed_over_padded"] = packed["tokens_per_s"] / padded["tokens_per_s"]
        (args.out / "gpu_sft.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2), flush=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation.py"), "--device", "cuda",
                        "--model-dir", str(base), "--batch-size", "16", "--max-new-tokens", "128", "--repeats", "2",
                        "--out", str(args.out / "generation_cuda.json")], check=False)


if __name__ == "__main__":
    main()
