"""MATH: extract the final answer (\\boxed{...}, \\fbox{...}, "final answer is ...") and compare it.

Comparison: first a normalized string comparison (cheap, catches most exact matches), then HuggingFace
`math-verify` (sympy based: 1/2 == 0.5 == \\frac12, (x+1)^2 == x^2+2x+1, intervals, sets, matrices).
math-verify can take unbounded time on pathological expressions, so every call is bounded:

* in the main thread its own SIGALRM timeouts apply;
* in any other thread (signals only work in the main thread) the comparison runs in a helper process
  that is killed when it overruns, so a verifier called from a worker thread can never hang.

A comparison that times out or crashes falls back to the normalized string comparison, and the verdict
says so in `details["method"]`.
"""

from __future__ import annotations

import atexit
import re
import threading
from typing import Any

from tulu_pipeline.rewards.boxed import last_boxed
from tulu_pipeline.rewards.verdict import Verdict

#: Seconds allowed for parsing one answer and for one comparison.
TIMEOUT_SECONDS = 5
#: Longer extracted answers skip math-verify (MATH's longest reference answer has 159 characters; a
#: degenerate response can box thousands, which would only burn the timeout).
MAX_ANSWER_CHARS = 1000


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"

_FINAL_ANSWER = re.compile(
    r"(?:final\s+answer\s*(?:is|:)|the\s+answer\s+is|answer\s*:)\s*(?P<ans>.+?)\s*(?:\n|$)",
    re.IGNORECASE,
)


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final answer of a solution and how it was found ('boxed', 'final_answer', 'none')."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    matches = list(_FINAL_ANSWER.finditer(text))
    if matches:
        answer = matches[-1].group("ans").strip()
        # "The final answer is $\frac{1}{2}$. I hope it is correct." -> \frac{1}{2}
        inline = re.match(r"\$+(.+?)\$+", answer)
        if inline:
            answer = inline.group(1)
        answer = answer.rstrip(".").strip()
        if answer:
            return answer, "final_answer"
    return None, "none"


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_UNITS = re.compile(
    r"\s*(?:\\text\{\s*)?(?:units?|cm|centimeters?|meters?|inches|inch|feet|foot|degrees?|dollars?|cents?|"
    r"square\s+units|sq\s+units|hours?|minutes?|seconds?|days?|miles?)\s*\}?\s*(?:\^\{?2\}?|\^\{?3\}?)?$"
)


def normalize_answer(answer: str) -> str:
    """A canonical string form of a LaTeX answer (spacing, \\left/\\right, \\dfrac, units, $, text wrappers)."""
    s = answer.strip()
    s = s.replace("\n", " ").strip("$ ").rstrip(".").strip()
    s = re.sub(r"\\[,;:! ]", "", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = _UNITS.sub("", s)
    # a number followed by a worded unit: "21\text{ dogs}" -> "21"
    s = re.sub(r"^(-?[\d.,]+)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}$", r"\1", s)
    for _ in range(3):
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)
    return s


# ---- math-verify, bounded ---------------------------------------------------------------------------


def _math_verify_inline(gold: str, pred: str, timeout_seconds: int | None) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout_seconds, raise_on_error=True)
    pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=timeout_seconds, raise_on_error=True)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds, raise_on_error=True))


def _worker_main(conn) -> None:  # pragma: no cover - runs in the helper process
    import logging

    # the helper disables math-verify's own (signal) timeouts on purpose: the parent kills it instead
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            gold, pred = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _math_verify_inline(gold, pred, timeout_seconds=None)))
        except Exception as exc:  # noqa: BLE001 - reported back to the caller
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _HelperProcess:
    """One helper process for calls made outside the main thread; killed and restarted on a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = None
        self._conn = None

    def _start(self) -> None:
        import multiprocessing

        # spawn, not fork: forking a process that runs threads (torch, Dagster) can deadlock
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child,), daemon=True, name="tulu-math-verify")
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
            self._conn.close()
        self._process = self._conn = None

    def compare(self, gold: str, pred: str, timeout_seconds: float) -> tuple[str, Any]:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._conn.send((gold, pred))
            # the first call also pays for the spawn and the sympy import
            if self._conn.poll(timeout_seconds + 30 if not getattr(self, "_warm", False) else timeout_seconds):
                self._warm = True
                return self._conn.recv()
            self.stop()
            self._warm = False
            return "timeout", f"math-verify took longer than {timeout_seconds}s"


_HELPER = _HelperProcess()
atexit.register(_HELPER.stop)


def math_verify_equal(gold: str, pred: str, timeout_seconds: int = TIMEOUT_SECONDS) -> tuple[str, Any]:
    """Compare two extracted answers with math-verify, bounded in time.

    Returns ("ok", bool), ("timeout", message) or ("error", message).
    """
    if threading.current_thread() is threading.main_thread():
        from math_verify.errors import TimeoutException

        try:
            return "ok", _math_verify_inline(gold, pred, timeout_seconds)
        except TimeoutException as exc:
            return "timeout", f"math-verify took longer than {timeout_seconds}s ({exc})"
        except Exception as exc:  # noqa: BLE001 - a parse failure is a verdict, not a crash
            return "error", f"{type(exc).__name__}: {exc}"
    return _HELPER.compare(gold, pred, timeout_seconds)


def verify_math(response: str, ground_truth: str, timeout_seconds: int = TIMEOUT_SECONDS) -> Verdict:
    """Score a response against a MATH reference (a bare answer or a full solution with \\boxed{})."""
    expected, gt_method = extract_answer(ground_truth)
    if expected is None:  # a bare answer, e.g. MATH-500's "answer" field
        expected, gt_method = ground_truth.strip(), "bare"
    if not expected.strip():
        raise ValueError(f"math ground truth has an empty answer ({gt_method}): {ground_truth[-200:]!r}")
    extracted, method = extract_answer(response)
    if extracted is not None and not extracted.strip():
        extracted, method = None, "empty_box"
    details: dict[str, Any] = {"extracted": extracted, "expected": expected, "extraction": method,
                               "ground_truth_extraction": gt_method}
    if extracted is None:
        return Verdict(0.0, False, f"no final answer found (no non-empty \\boxed{{}} or 'final answer is'); "
                       f"expected {expected!r}", {**details, "method": "none"})
    if normalize_answer(extracted) == normalize_answer(expected):
        ok, how = True, "normalized_string"
    elif len(extracted) > MAX_ANSWER_CHARS:
        ok, how = False, "normalized_string (answer too long for math-verify)"
    else:
        status, value = math_verify_equal(expected, extracted, timeout_seconds)
        if status == "ok":
            ok, how = value, "math_verify"
        else:
            # the library's messages echo the whole expression: keep the verdict readable
            ok, how = False, f"normalized_string (math-verify {status})"
            details["math_verify_error"] = _shorten(str(value))
    details["method"] = how
    verb = "equals" if ok else "does not equal"
    reason = f"extracted {_shorten(extracted)!r} ({method}) {verb} expected {_shorten(expected)!r} [{how}]"
    return Verdict(1.0 if ok else 0.0, ok, reason, details)
