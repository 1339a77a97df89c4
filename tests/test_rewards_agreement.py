"""Agreement with the bundled reference data, on a spread sample (benchmarks/verify.py runs every row).

Gold GSM8K and MATH solutions verify against their own answers; perturbed answers fail; the IFEval
verdicts reproduce the official checker's on its published GPT-4 responses.
"""

from __future__ import annotations

import pytest

from tulu_pipeline.rewards import agreement

SAMPLE = 300


def _sample(bundle, name):
    path = bundle / name
    return agreement.read_jsonl(path, limit=SAMPLE, stride=agreement.sample_stride(path, SAMPLE))


@pytest.mark.parametrize("name", agreement.GSM8K_FILES)
def test_gsm8k_gold_verifies_and_perturbed_fails(bundle, name):
    result = agreement.run_cases("gsm8k", agreement.gsm8k_cases(_sample(bundle, name)))
    kinds = result["kinds"]
    assert kinds["gold_vs_solution"]["count"] == SAMPLE
    assert kinds["gold_vs_solution"]["rate"] >= 0.99, result["exceptions"]
    assert kinds["gold_vs_bare_answer"]["rate"] >= 0.99, result["exceptions"]
    assert kinds["perturbed_answer_plus_1"]["rate"] >= 0.99, result["exceptions"]


@pytest.mark.parametrize("name", ["eval/math500/test.jsonl", "eval/math/test.jsonl"])
def test_math_gold_verifies_and_perturbed_fails(bundle, name):
    rows = _sample(bundle, name)
    result = agreement.run_cases("math", agreement.math_cases(rows, agreement.MATH_FILES[name]))
    kinds = result["kinds"]
    assert kinds["gold_vs_own_answer"]["count"] == len(rows)
    assert kinds["gold_vs_own_answer"]["rate"] >= 0.99, result["exceptions"]
    assert kinds["perturbed_boxed"]["count"] >= 0.95 * len(rows)
    assert kinds["perturbed_boxed"]["rate"] >= 0.99, result["exceptions"]


def test_ifeval_reproduces_official_verdicts(bundle):
    report = agreement.ifeval_agreement(bundle, limit=SAMPLE)
    for mode in ("strict", "loose"):
        assert report[mode]["prompts"] == SAMPLE
        assert report[mode]["prompt_rate"] >= 0.98, report[mode]["exceptions"]
        assert report[mode]["instruction_rate"] >= 0.99, report[mode]["exceptions"]
