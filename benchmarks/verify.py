"""Verifier agreement and throughput over the whole bundled GSM8K, MATH, MATH-500 and IFEval files.

Measured (each with its throughput, verifications per second on this machine):

- GSM8K test + train: every gold solution verifies against its own answer, given as the full solution
  ("#### N") and as the bare number; the solution with its final answer changed to N+1 must fail.
- MATH test + train (ground truth: the reference solution's \\boxed{}) and MATH-500 (ground truth: its
  separate "answer" field, a real cross-check): the gold solution must verify; the solution with its
  last \\boxed{} replaced by a different value (number + 1, else the next problem's answer) must fail.
- IFEval: agreement with the official checker's published strict and loose verdicts on the official
  GPT-4 responses, per prompt and per instruction.

Baselines in the same run:

- MATH without math-verify (normalized string comparison only): how many gold answers need the
  symbolic comparison (MATH-500's answer field vs the solution's box is not always the same string).
- IFEval sentence counting with a naive regex splitter (split after . ! ? followed by whitespace)
  instead of nupunkt: agreement with the official verdicts on the number_sentences instructions.

Every disagreement is listed with the verifier's reason under "exceptions".

    .venv/bin/python benchmarks/verify.py [--sample N] [--out benchmarks/results/verify.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tulu_pipeline import settings
from tulu_pipeline.rewards import agreement, ifeval
from tulu_pipeline.rewards.math_answer import extract_answer, normalize_answer


def _rows(path: Path, sample: int | None) -> list[dict]:
    return agreement.read_jsonl(path, limit=sample, stride=agreement.sample_stride(path, sample))


def math_string_only_baseline(rows: list[dict], truth: str) -> dict:
    """Gold agreement when answers are compared as normalized strings only (no math-verify)."""
    agree = 0
    for row in rows:
        expected = row["answer"] if truth == "answer" else extract_answer(row["solution"])[0]
        extracted = extract_answer(row["solution"])[0]
        agree += extracted is not None and normalize_answer(extracted) == normalize_answer(expected)
    return {"count": len(rows), "agree": agree, "rate": round(agree / len(rows), 5) if rows else None}


def ifeval_naive_sentence_baseline(data_dir: Path) -> dict:
    """Official-verdict agreement on number_sentences when sentences are split by a naive regex."""
    directory = data_dir / agreement.IFEVAL_DIR
    inputs = {row["prompt"]: row for row in agreement.read_jsonl(directory / "input_data.jsonl")}
    out = {}
    for mode in ("strict", "loose"):
        total = naive_agree = ours_agree = 0
        for ref in agreement.read_jsonl(directory / f"eval_results_{mode}.jsonl"):
            row = inputs[ref["prompt"]]
            for index, instruction_id in enumerate(row["instruction_id_list"]):
                if instruction_id != "length_constraints:number_sentences":
                    continue
                kwargs = ifeval.normalize_kwargs(instruction_id, row["kwargs"][index])
                variants = [ref["response"]] if mode == "strict" else ifeval.loose_variants(ref["response"])
                naive = any(v.strip() and ifeval._relation_ok(
                    len([s for s in re.split(r"(?<=[.!?])\s+", v.strip()) if s]), kwargs["relation"],
                    kwargs["num_sentences"]) for v in variants)
                ours = ifeval.check_instruction(instruction_id, kwargs, ref["response"], mode)[0]
                official = ref["follow_instruction_list"][index]
                total += 1
                naive_agree += naive == official
                ours_agree += ours == official
        out[mode] = {"instructions": total, "naive_regex_agree": naive_agree, "nupunkt_agree": ours_agree}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, help="rows per file (a spread sample); default: every row")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "verify.json")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or settings.data_dir()
    started = time.perf_counter()
    result: dict = {"sample_per_file": args.sample, "machine": {"python": platform.python_version(),
                                                               "processor": platform.machine()},
                    "gsm8k": {}, "math": {}, "math_string_only_baseline": {}}
    for name in agreement.GSM8K_FILES:
        rows = _rows(data_dir / name, args.sample)
        result["gsm8k"][name] = {"rows": len(rows), **agreement.run_cases("gsm8k", agreement.gsm8k_cases(rows))}
        print(name, result["gsm8k"][name]["kinds"], flush=True)
    for name, truth in agreement.MATH_FILES.items():
        path = data_dir / name
        if not path.exists():
            continue
        rows = _rows(path, args.sample)
        result["math"][name] = {"rows": len(rows), "ground_truth": truth,
                                **agreement.run_cases("math", agreement.math_cases(rows, truth))}
        result["math_string_only_baseline"][name] = math_string_only_baseline(rows, truth)
        print(name, result["math"][name]["kinds"], flush=True)
    result["ifeval"] = agreement.ifeval_agreement(data_dir, limit=args.sample)
    result["ifeval_sentence_baseline"] = ifeval_naive_sentence_baseline(data_dir)
    for mode in ("strict", "loose"):
        r = result["ifeval"][mode]
        print(f"ifeval {mode}: prompts {r['prompt_agree']}/{r['prompts']}, "
              f"instructions {r['instruction_agree']}/{r['instructions']}", flush=True)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out} in {result['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
