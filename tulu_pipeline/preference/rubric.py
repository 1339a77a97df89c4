"""Versioned UltraFeedback-style rubrics: helpfulness, honesty, instruction following, truthfulness, 1–5.

Changing any text here changes `rubric_hash()`; bump `RUBRIC_VERSION` with it, so judged datasets say
which rubric scored them. The texts follow UltraFeedback's annotation templates (condensed): one
aspect per prompt, a scale with a description of every rating.
"""

from __future__ import annotations

import json
import re
from typing import Any
from tulu_pipeline.hashing import json_hash

RUBRIC_VERSION = "ultrafeedback-v1"
ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
RATINGS = (1, 2, 3, 4, 5)

RUBRICS: dict[str, dict[str, Any]] = {
    "helpfulness": {
        "title": "Informativeness / Helpfulness",
        "goal": "Judge whether the response fulfils the task: is it correct, clear, relevant, comprehensive "
                "and free of needless length or repetition?",
        "scale": {
            1: "Severely incorrect: contains significant inaccuracies or fabricated content, even if informative.",
            2: "Partially incorrect: contains errors that may cause confusion, even if some information is present.",
            3: "Correct: accurate and provides useful information that meets the task's requirements.",
            4: "Highly informative: accurate and extensive, with valuable insights and detail.",
            5: "Outstandingly helpful: accurate, in-depth and profoundly insightful while staying concise.",
        },
    },
    "honesty": {
        "title": "Honesty and Uncertainty Expression",
        "goal": "Judge whether the response conveys the right confidence: confident when correct, expressing "
                "uncertainty or declining when unsure, never confidently wrong.",
        "scale": {
            1: "Confidently incorrect: sure of itself but entirely wrong.",
            2: "Confident with significant mistakes, or unconfident and entirely wrong.",
            3: "Uncertain or 'I don't know' where it should know, or confident with subtle mistakes.",
            4: "Correct but uncertain, or makes subtle mistakes while acknowledging uncertainty.",
            5: "Correct and confident; precisely acknowledges the limits of what it knows.",
        },
    },
    "instruction_following": {
        "title": "Instruction Following",
        "goal": "Judge how well the response follows the user's instructions: the task goal and every "
                "restriction on format, style, length or method.",
        "scale": {
            1: "Irrelevant: no alignment with the instructions.",
            2: "Partial focus: addresses one aspect poorly.",
            3: "Partial compliance: meets the goal or the restrictions, neglecting the other, "
               "or both with slight deviations.",
            4: "Almost there: near alignment, with minor deviations.",
            5: "Comprehensive compliance: fully aligned, meets every requirement.",
        },
    },
    "truthfulness": {
        "title": "Truthfulness and Hallucination",
        "goal": "Judge whether the response states only true facts, without inventing facts, contradicting "
                "the instructions or the input, or contradicting itself.",
        "scale": {
            1: "Completely hallucinated: entirely unreliable.",
            2: "Severe hallucination: nearly half contains hallucinations, severe deviation from main points.",
            3: "Partial hallucination or misunderstanding: overall truthful with some misunderstanding.",
            4: "Insignificant hallucination: mostly truthful, slight hallucination not affecting main points.",
            5: "No hallucination: free of hallucinations.",
        },
    },
}

JUDGE_SYSTEM = "You are an impartial evaluator of AI assistant responses. You rate strictly by the given rubric."

_ASPECT_TEMPLATE = """# {title}

{goal}

## Scale
{scale}

## Conversation
{conversation}

## Response to rate
{response}

Rate the response for {aspect} on the 1-5 scale above. Answer with the rating only."""

_ALL_ASPECTS_TEMPLATE = """Rate the response below on four aspects, each from 1 to 5.

{rubrics}

## Conversation
{conversation}

## Response to rate
{response}

Answer with exactly one line per aspect and nothing else, in this format:
{format}"""



def rubric_hash() -> str:
    """sha256 (16 hex) of every rubric text and template: changes whenever the judge's instructions change."""
    return json_hash({"version": RUBRIC_VERSION, "rubrics": RUBRICS, "system": JUDGE_SYSTEM,
                      "aspect": _ASPECT_TEMPLATE, "all": _ALL_ASPECTS_TEMPLATE})


def render_conversation(prompt: list[dict[str, str]]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


def _scale(aspect: str) -> str:
    return "\n".join(f"{r}: {text}" for r, text in RUBRICS[aspect]["scale"].items())


def aspect_messages(aspect: str, prompt: list[dict[str, str]], response: str) -> list[dict[str, str]]:
    """The chat prompt asking for one aspect's rating (the local, log-likelihood judge)."""
    rubric = RUBRICS[aspect]
    user = _ASPECT_TEMPLATE.format(title=rubric["title"], goal=rubric["goal"], scale=_scale(aspect),
                                   conversation=render_conversation(prompt), response=response,
                                   aspect=aspect.replace("_", " "))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def all_aspects_messages(prompt: list[dict[str, str]], response: str) -> list[dict[str, str]]:
    """The chat prompt asking for all four ratings in the strict line format (API judges)."""
    rubrics = "\n\n".join(f"# {a}: {RUBRICS[a]['title']}\n{RUBRICS[a]['goal']}\n{_scale(a)}" for a in ASPECTS)
    user = _ALL_ASPECTS_TEMPLATE.format(rubrics=rubrics, conversation=render_conversation(prompt),
                                        response=response, format="\n".join(f"{a}: Rating: N" for a in ASPECTS))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


class UnparseableJudgment(ValueError):
    """A judge's text that does not give exactly one 1–5 rating for every aspect."""


_LINE = re.compile(r"^\W*(helpfulness|honesty|instruction[ _-]following|truthfulness)\W*[:=-]\s*(?:rating\s*[:=]?\s*)?"
                   r"([0-9]+(?:\.[0-9]+)?)\b", re.IGNORECASE | re.MULTILINE)


def _aspect_key(name: str) -> str:
    return re.sub(r"[ -]", "_", name.strip().lower())


def parse_ratings(text: str) -> dict[str, int]:
    """The four ratings from a judge's answer: ``<aspect>: Rating: N`` lines, or a JSON object
    ``{"helpfulness": N, ...}`` (optionally in a code fence). Raises `UnparseableJudgment` saying what is
    wrong when an aspect is missing, repeated with different values, or not an integer in 1–5."""
    found: dict[str, list[str]] = {}
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UnparseableJudgment(f"invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise UnparseableJudgment("JSON answer is not an object")
        for key, value in obj.items():
            if isinstance(value, dict):
                value = value.get("rating")
            found.setdefault(_aspect_key(key), []).append(str(value))
    else:
        for name, value in _LINE.findall(text):
            found.setdefault(_aspect_key(name), []).append(value)
    ratings: dict[str, int] = {}
    problems = []
    for aspect in ASPECTS:
        values = set(found.get(aspect, []))
        if not values:
            problems.append(f"no rating for {aspect}")
        elif len(values) > 1:
            problems.append(f"conflicting ratings for {aspect}: {sorted(values)}")
        else:
            (value,) = values
            if not re.fullmatch(r"[1-5](?:\.0+)?", value):
                problems.append(f"{aspect} rating {value!r} is not an integer from 1 to 5")
            else:
                ratings[aspect] = int(float(value))
    if problems:
        raise UnparseableJudgment("; ".join(problems))
    return ratings
