"""Verifiable rewards (Tülu 3 RLVR): GSM8K, MATH and IFEval verifiers behind one call.

    from tulu_pipeline.rewards import verify, reward, Verdict, TASKS
    verify("gsm8k", "... so the answer is $1,000.", ground_truth="#### 1000").ok      # True
    verify("math", "... $\\boxed{0.5}$", ground_truth="\\frac{1}{2}").ok              # True
    verify("ifeval", text, constraints={"instruction_id_list": [...], "kwargs": [...]}, mode="loose")

Heavy dependencies (math-verify/sympy, langdetect, nupunkt) load on first use.
"""

from __future__ import annotations

from tulu_pipeline.rewards.verdict import Verdict

TASKS = ("gsm8k", "math", "ifeval")
MODES = ("strict", "loose")

__all__ = ["MODES", "TASKS", "Verdict", "reward", "verify"]


def verify(task: str, response: str, *, ground_truth: str | None = None, constraints: dict | None = None,
           mode: str = "strict") -> Verdict:
    """Verify one response.

    gsm8k/math need `ground_truth` (a bare answer, or the full reference solution with "#### N" /
    \\boxed{}); ifeval needs `constraints` ({"instruction_id_list": [...], "kwargs": [...]} as in IFEval's
    input data) and honours `mode` ("strict" or "loose", the official loose variants; gsm8k and math have
    a single mode and accept either value). Raises ValueError
    for an unknown task or mode, a missing or malformed ground truth or constraints, or a non-string response.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if not isinstance(response, str):
        raise ValueError(f"response must be a string, got {type(response).__name__}")
    if task == "ifeval":
        from tulu_pipeline.rewards.ifeval import verify_ifeval

        return verify_ifeval(response, constraints, mode)
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"{task} needs a non-empty string ground_truth, got {ground_truth!r}")
    if task == "gsm8k":
        from tulu_pipeline.rewards.gsm8k import verify_gsm8k

        return verify_gsm8k(response, ground_truth)
    from tulu_pipeline.rewards.math_answer import verify_math

    return verify_math(response, ground_truth)


def reward(task: str, response: str, *, ground_truth: str | None = None, constraints: dict | None = None,
           correct_value: float = 10.0) -> float:
    """Tülu 3's RLVR reward: `correct_value` when the response verifies (strict mode), else 0.0."""
    verdict = verify(task, response, ground_truth=ground_truth, constraints=constraints)
    return correct_value if verdict.ok else 0.0
