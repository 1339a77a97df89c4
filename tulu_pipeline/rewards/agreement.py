"""Agreement of the verifiers with the bundled reference data.

* GSM8K / MATH: every gold reference solution must verify against its own answer, and a perturbed
  answer (the number + 1, or another problem's answer) must not.
* IFEval: the verdicts must reproduce the official checker's published strict/loose verdicts on the
  official GPT-4 responses.

Used by tests/test_rewards_agreement.py (a sample) and benchmarks/verify.py (the whole files).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tulu_pipeline.rewards import verify
from tulu_pipeline.rewards.boxed import boxed_spans
from tulu_pipeline.rewards.math_answer import extract_answer, normalize_answer

#: bundled file (relative to the data dir) -> (task, how the ground truth is given)
MATH_FILES = {"eval/math/test.jsonl": "solution", "train/math/train.jsonl": "solution",
              "eval/math500/test.jsonl": "answer"}
GSM8K_FILES = ("eval/gsm8k/test.jsonl", "train/gsm8k/train.jsonl")
IFEVAL_DIR = "eval/ifeval"


def read_jsonl(path: Path, limit: int | None = None, stride: int = 1) -> list[dict[str, Any]]:
    """Rows of a JSONL file, every `stride`-th, at most `limit` of them (a deterministic spread sample)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index % stride:
                continue
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def sample_stride(path: Path, sample: int | None) -> int:
    if not sample:
        return 1
    with open(path, encoding="utf-8") as handle:
        total = sum(1 for _ in handle)
    return max(1, total // sample)


def _perturb_number(text: str) -> str | None:
    value = text.strip().replace(",", "")
    if re.fullmatch(r"-?\d+", value):
        return str(int(value) + 1)
    if re.fullmatch(r"-?\d*\.\d+", value):
        return str(round(float(value) + 1, 6))
    return None


def _replace_last_boxed(solution: str, new: str) -> str:
    start, end, _ = boxed_spans(solution)[-1]
    return solution[:start] + new + solution[end:]


def gsm8k_cases(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """(id, response, ground_truth, expect_ok) cases for gold and perturbed GSM8K answers."""
    for index, row in enumerate(rows):
        solution = row["answer"]
        final = solution.rsplit("####", 1)[1].strip()
        bumped = _perturb_number(final)
        yield {"id": index, "kind": "gold_vs_solution", "response": solution, "ground_truth": solution,
               "expect_ok": True}
        yield {"id": index, "kind": "gold_vs_bare_answer", "response": solution, "ground_truth": final,
               "expect_ok": True}
        if bumped is not None:
            perturbed = solution.rsplit("####", 1)[0] + "#### " + bumped
            yield {"id": index, "kind": "perturbed_answer_plus_1", "response": perturbed, "ground_truth": solution,
                   "expect_ok": False}


def math_cases(rows: list[dict[str, Any]], truth: str) -> Iterator[dict[str, Any]]:
    """Gold and perturbed cases for MATH rows; `truth` is "solution" (boxed in it) or "answer" (a field)."""
    answers = [extract_answer(row["solution"])[0] for row in rows]
    answers = [a if a and a.strip() else None for a in answers]
    for index, row in enumerate(rows):
        item_id = row.get("unique_id", index)
        ground_truth = row["answer"] if truth == "answer" else row["solution"]
        yield {"id": item_id, "kind": "gold_vs_own_answer", "response": row["solution"],
               "ground_truth": ground_truth, "expect_ok": True}
        own = answers[index]
        if not own or not own.strip():
            continue
        other = _perturb_number(normalize_answer(own))
        if other is None:
            # the next problem's answer that differs as a string: "a different boxed value"
            for step in range(1, len(rows)):
                candidate = answers[(index + step) % len(rows)]
                if candidate is not None and normalize_answer(candidate) != normalize_answer(own):
                    other = candidate
                    break
        if other is not None:
            yield {"id": item_id, "kind": "perturbed_boxed", "response": _replace_last_boxed(row["solution"], other),
                   "ground_truth": ground_truth, "expect_ok": False, "perturbed_to": other}


def run_cases(task: str, cases: Iterable[dict[str, Any]], max_exceptions: int = 200) -> dict[str, Any]:
    """Verify every case; count agreement per kind and keep the disagreements with their reasons."""
    kinds: dict[str, dict[str, int]] = {}
    exceptions = []
    started = time.perf_counter()
    total = 0
    for case in cases:
        stats = kinds.setdefault(case["kind"], {"count": 0, "agree": 0})
        stats["count"] += 1
        total += 1
        try:
            verdict = verify(task, case["response"], ground_truth=case["ground_truth"])
        except ValueError as exc:  # a defective reference (e.g. an empty \boxed{}) is an exception, not a crash
            exceptions.append({"id": case["id"], "kind": case["kind"], "expected_ok": case["expect_ok"],
                               "reason": f"invalid reference: {exc}"[:400]})
            continue
        if verdict.ok == case["expect_ok"]:
            stats["agree"] += 1
        elif len(exceptions) < max_exceptions:
            exceptions.append({"id": case["id"], "kind": case["kind"], "expected_ok": case["expect_ok"],
                               "reason": verdict.reason[:400]})
    elapsed = time.perf_counter() - started
    for stats in kinds.values():
        stats["rate"] = round(stats["agree"] / stats["count"], 5) if stats["count"] else None
    return {"kinds": kinds, "exceptions": exceptions, "verifications": total, "seconds": round(elapsed, 2),
            "per_second": round(total / elapsed, 1) if elapsed else None}


def _known_difference(instruction_id: str, row: dict[str, Any], result: dict[str, Any]) -> str:
    """Why a disagreement with the official verdict is expected, where the cause is known."""
    kwargs = row["kwargs"][row["instruction_id_list"].index(instruction_id)]
    if instruction_id == "keywords:letter_frequency" and not str(kwargs.get("letter", "")).isalpha():
        return ("the official checker that produced these verdicts replaced a non-letter 'letter' kwarg "
                f"({kwargs.get('letter')!r}) by a random ASCII letter; we count the character asked for")
    if instruction_id == "length_constraints:number_sentences":
        return "sentence splitter: nupunkt with general-English abbreviations vs NLTK punkt's English model"
    if instruction_id == "change_case:capital_word_frequency":
        return "word tokenizer: Treebank-like splitter vs nltk.word_tokenize"
    return "unexplained"


def ifeval_agreement(data_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Agreement with the official checker's verdicts on the official GPT-4 responses, strict and loose."""
    directory = data_dir / IFEVAL_DIR
    inputs = {row["prompt"]: row for row in read_jsonl(directory / "input_data.jsonl")}
    report: dict[str, Any] = {}
    for mode in ("strict", "loose"):
        prompts = prompt_agree = instructions = instruction_agree = 0
        exceptions = []
        started = time.perf_counter()
        for ref in read_jsonl(directory / f"eval_results_{mode}.jsonl", limit=limit):
            row = inputs[ref["prompt"]]
            verdict = verify("ifeval", ref["response"], mode=mode, constraints={
                "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]})
            prompts += 1
            prompt_agree += verdict.ok == ref["follow_all_instructions"]
            for result, official in zip(verdict.details["instructions"], ref["follow_instruction_list"]):
                instructions += 1
                if result["ok"] == official:
                    instruction_agree += 1
                else:
                    exceptions.append({"key": row["key"], "instruction_id": result["instruction_id"],
                                       "ours": result["ok"], "official": official, "observed": result["observed"],
                                       "why": _known_difference(result["instruction_id"], row, result)})
        elapsed = time.perf_counter() - started
        report[mode] = {"prompts": prompts, "prompt_agree": prompt_agree,
                        "prompt_rate": round(prompt_agree / prompts, 5) if prompts else None,
                        "instructions": instructions, "instruction_agree": instruction_agree,
                        "instruction_rate": round(instruction_agree / instructions, 5) if instructions else None,
                        "exceptions": exceptions, "seconds": round(elapsed, 2),
                        "per_second": round(prompts / elapsed, 1) if elapsed else None}
    return report
