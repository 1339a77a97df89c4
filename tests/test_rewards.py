"""GSM8K and MATH verifiers, the public verify()/reward() API, and bounded math-verify calls."""

from __future__ import annotations

import dataclasses
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tulu_pipeline.rewards import TASKS, Verdict, reward, verify
from tulu_pipeline.rewards.boxed import all_boxed, last_boxed
from tulu_pipeline.rewards.gsm8k import extract_answer as gsm8k_extract
from tulu_pipeline.rewards.math_answer import extract_answer as math_extract
from tulu_pipeline.rewards.math_answer import normalize_answer, verify_math

GSM8K_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                  "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18")


def test_public_api_shape():
    assert TASKS == ("gsm8k", "math", "ifeval")
    verdict = verify("gsm8k", "#### 18", ground_truth="18")
    assert isinstance(verdict, Verdict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.ok = False  # type: ignore[misc]
    assert set(verdict.details) >= {"extracted", "expected"}


@pytest.mark.parametrize("response, expected", [
    ("The answer is $1,000.", 1000),
    ("So she pays $5.00 in total.", 5),
    ("The discount is 25%.", 25),
    ("He walks 12 km per day, so 84 km in a week.", 84),
    ("The temperature drops to -7 degrees.", -7),
    ("Final answer: −3", -3),
    ("5-3 = 2 apples remain.", 2),
    ("We compute 3 + 4 = 7.\n#### 7", 7),
    ("Thus the total is \\boxed{1,234}.", 1234),
    ("The answer is 42. I double-checked with 6 * 7 = 42 and 40 + 2.", 42),
    ("It takes 2.5 hours.", 2.5),
    ("Half of it: \\boxed{\\frac{1}{2}}", 0.5),
    ("In 2023 she had 3 cats; the answer is 3 cats.", 3),
    ("The answer is 3/4 of a cup.", 0.75),
    ("**Answer:** 1,250,000 dollars", 1250000),
])
def test_gsm8k_extraction(response, expected):
    value, _method = gsm8k_extract(response)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize("ground_truth", [GSM8K_SOLUTION, "18", "18.0", "$18", "#### 18"])
def test_gsm8k_reference_forms(ground_truth):
    assert verify("gsm8k", "She makes 18 dollars a day.", ground_truth=ground_truth).ok


def test_gsm8k_wrong_and_missing_answers():
    wrong = verify("gsm8k", "She makes 19 dollars.", ground_truth=GSM8K_SOLUTION)
    assert not wrong.ok and wrong.score == 0.0
    assert "extracted 19" in wrong.reason and "expected 18" in wrong.reason
    none = verify("gsm8k", "I don't know.", ground_truth="18")
    assert not none.ok and none.details["method"] == "none"
    # integers compare exactly even when large; decimals within a tolerance
    assert not verify("gsm8k", "#### 1000001", ground_truth="1000000").ok
    assert verify("gsm8k", "#### 0.30000000000000004", ground_truth="0.3").ok
    with pytest.raises(ValueError, match="no number"):
        verify("gsm8k", "18", ground_truth="eighteen")


def test_boxed_nested_and_fbox():
    text = r"so \boxed{\frac{a^{2}}{b_{1}}} and later \fbox{x^{2}} then \boxed 5"
    assert all_boxed(text) == [r"\frac{a^{2}}{b_{1}}", "x^{2}", "5"]
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{unbalanced") is None


@pytest.mark.parametrize("text, expected", [
    (r"Thus $\boxed{\left( 3, \frac{\pi}{2} \right)}.$", r"\left( 3, \frac{\pi}{2} \right)"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", r"\frac{1}{2}"),
    ("Final Answer: 7", "7"),
    ("the answer is x = 4.", "x = 4"),
])
def test_math_extraction(text, expected):
    assert math_extract(text)[0] == expected


@pytest.mark.parametrize("response, ground_truth", [
    (r"$\boxed{0.5}$", r"\frac12"),
    (r"$\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}"),
    (r"$\boxed{(3, \pi/2)}$", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"$\boxed{(x+1)^2}$", "x^2+2x+1"),
    (r"$\boxed{10\%}$", "10"),
    (r"$\boxed{90^\circ}$", "90"),
    (r"$\boxed{\text{(C)}}$", "C"),
    (r"$\boxed{1,000}$", "1000"),
    (r"$\boxed{x=4}$", "4"),
    (r"$\boxed{5 \text{ cm}}$", "5"),
    (r"$\boxed{21}$", r"21\text{ dogs}"),
    (r"The final answer is $\sqrt{2}/2$.", r"\frac{\sqrt{2}}{2}"),
])
def test_math_equivalent_answers(response, ground_truth):
    verdict = verify("math", response, ground_truth=ground_truth)
    assert verdict.ok, verdict.reason
    assert verdict.score == 1.0


@pytest.mark.parametrize("response, ground_truth", [
    (r"$\boxed{0.51}$", r"\frac12"),
    (r"$\boxed{(x+1)^3}$", "x^2+2x+1"),
    (r"$\boxed{(3, \pi)}$", r"\left( 3, \frac{\pi}{2} \right)"),
    ("I think it is 5.", "5"),  # no boxed / final-answer marker: not a verifiable answer
    (r"$\boxed{}$", "5"),
])
def test_math_wrong_answers(response, ground_truth):
    verdict = verify("math", response, ground_truth=ground_truth)
    assert not verdict.ok and verdict.score == 0.0


def test_math_ground_truth_may_be_a_full_solution():
    solution = r"We have $r = 3$ and so the answer is $\boxed{\left( 3, \frac{\pi}{2} \right)}.$"
    verdict = verify("math", r"So $\boxed{(3,\frac{\pi}{2})}$", ground_truth=solution)
    assert verdict.ok and verdict.details["ground_truth_extraction"] == "boxed"


def test_normalize_answer():
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right).") == normalize_answer(r"(3,\frac{\pi}{2})")
    assert normalize_answer(r"\$1,000.50") == "1000.5"
    assert normalize_answer(r"\text{Evelyn}") == "Evelyn"


def test_math_pathological_answer_times_out_in_main_thread():
    verdict = verify_math(r"$\boxed{9^{9^{9^{9}}}}$", "5", timeout_seconds=1)
    assert not verdict.ok
    assert "timeout" in verdict.details["method"]


def test_math_verify_outside_the_main_thread_is_bounded():
    out = []

    def work():
        out.append(verify_math(r"$\boxed{x^2+2x+1}$", "(x+1)^2"))
        out.append(verify_math(r"$\boxed{9^{9^{9^{9}}}}$", "5", timeout_seconds=1))
        out.append(verify_math(r"$\boxed{0.5}$", r"\frac{1}{2}"))  # the helper restarts after a kill

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert [v.ok for v in out] == [True, False, True]
    assert "timeout" in out[1].details["method"]


def test_reward_is_tulu3_rlvr_value():
    assert reward("gsm8k", "#### 18", ground_truth="18") == 10.0
    assert reward("gsm8k", "#### 17", ground_truth="18") == 0.0
    assert reward("math", r"$\boxed{2}$", ground_truth="2", correct_value=1.0) == 1.0
    constraints = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert reward("ifeval", "no commas", constraints=constraints) == 10.0


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "code"}, "unknown task"),
    ({"mode": "lenient"}, "unknown mode"),
    ({"ground_truth": None}, "non-empty string ground_truth"),
    ({"ground_truth": "  "}, "non-empty string ground_truth"),
    ({"response": None}, "response must be a string"),
])
def test_verify_rejects_bad_arguments(kwargs, message):
    call = {"task": "gsm8k", "response": "#### 1", "ground_truth": "1", **kwargs}
    with pytest.raises(ValueError, match=message):
        verify(call.pop("task"), call.pop("response"), **call)


def _reference_boxed(text):
    """The plain depth-counting scan from each \\boxed{ (quadratic; the reference for the linear version)."""
    out = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        for pos in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                out.append(text[match.end():pos].strip())
                break
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed{", "\\fbox{", "{", "}", "a", " ", "x^2"]), max_size=25).map("".join))
def test_linear_boxed_matches_depth_scan(text):
    assert all_boxed(text) == _reference_boxed(text)


def test_many_unclosed_boxes_finish():
    text = "\\boxed{" * 20000 + "7"
    assert last_boxed(text) is None
    assert not verify("gsm8k", text, ground_truth="8").ok
    assert not verify("math", text, ground_truth="7").ok


def test_math_overlong_answer_skips_math_verify_and_reason_stays_short():
    verdict = verify("math", "\\boxed{" + "a" * 5000 + "}", ground_truth="1")
    assert not verdict.ok
    assert verdict.details["method"] == "normalized_string (answer too long for math-verify)"
    assert len(verdict.reason) < 400
