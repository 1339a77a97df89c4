"""Judges: 1–5 ratings on the four rubric aspects for each (prompt, response).

- `LoglikelihoodJudge` (local model, the default): for every aspect, the log-likelihood of each rating
  "1".."5" as the continuation of the aspect's rubric prompt; the rating is the argmax, the expected
  value under the normalized probabilities is kept too. It cannot produce an unparseable judgment.
- `ChatJudge` (an OpenAI-compatible endpoint in production): one generation asking for all four
  ratings in a strict line format, parsed by `parse_ratings`. An unparseable answer is retried with a
  different seed (and a sampling temperature, since at temperature 0 a new seed changes nothing) up to
  ``max_retries`` times, then quarantined with every raw text and the reason; never silently scored.

`run_judging` reads a requests JSONL (``{"completion_id", "prompt", "response"}``) and writes one
judgment per line; `tulu_pipeline.preference.judge_job` runs it in its own process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from tulu_pipeline.generation.base import Messages, SamplingParams
from tulu_pipeline.preference.rubric import (
    ASPECTS, RATINGS, RUBRIC_VERSION, UnparseableJudgment, all_aspects_messages, aspect_messages, parse_ratings,
    rubric_hash
)
from tulu_pipeline.storage import Store, batched

JUDGE_KINDS = ("local", "openai")
# Seeds of retry attempt a are seed + a * RETRY_SEED_STRIDE: far from the seeds of the other requests of a batch.
RETRY_SEED_STRIDE = 1_000_003


def judge_identity(kind: str, model_id: str) -> str:
    """The judge id recorded on every rating and pair: kind, model, rubric version and rubric hash."""
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge kind must be one of {JUDGE_KINDS}, got {kind!r}")
    return f"{kind}:{model_id}:{RUBRIC_VERSION}:{rubric_hash()}"


@dataclass(frozen=True)
class JudgeItem:
    completion_id: str
    prompt: Messages
    response: str


@dataclass
class Judgment:
    """The ratings of one completion (``ratings[aspect] = {"rating", "expected"?, "probs"?}``), or, when
    ``ratings`` is None, why it was quarantined (``reason``) with the judge's raw answers."""

    completion_id: str
    ratings: dict[str, dict[str, Any]] | None
    attempts: int = 1
    raw: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def mean_rating(self) -> float | None:
        if self.ratings is None:
            return None
        return sum(self.ratings[a]["rating"] for a in ASPECTS) / len(ASPECTS)

    @property
    def mean_expected(self) -> float | None:
        """Mean over aspects of the expected rating (log-likelihood judges only): finer than the argmax,
        so it separates completions a small judge rates alike."""
        if self.ratings is None or any("expected" not in self.ratings[a] for a in ASPECTS):
            return None
        return sum(self.ratings[a]["expected"] for a in ASPECTS) / len(ASPECTS)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean_rating": self.mean_rating, "mean_expected": self.mean_expected}


class Judge(Protocol):
    judge_id: str

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgment]: ...


class LoglikelihoodScorer(Protocol):
    """``loglikelihood`` is required. A scorer may also offer ``next_token_logprobs(contexts, candidates)``
    (for each context, the log-probability of each single-token candidate as the next token): one forward
    pass per context instead of one per candidate, which the judge then uses (5x fewer passes)."""

    def loglikelihood(self, requests: list[tuple[Messages, str]]) -> list[tuple[float, int]]: ...


def rating_distribution(logprobs: Sequence[float]) -> tuple[int, float, list[float]]:
    """(argmax rating, expected rating, probabilities) from the log-likelihoods of ratings 1..5."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    probs = [w / total for w in weights]
    best = RATINGS[max(range(len(RATINGS)), key=lambda i: (logprobs[i], -i))]  # ties: the lower rating
    return best, sum(r * p for r, p in zip(RATINGS, probs)), probs


class LoglikelihoodJudge:
    """Constrained choice among "1".."5" by log-likelihood under a local model (see module doc)."""

    def __init__(self, scorer: LoglikelihoodScorer, judge_id: str):
        self.scorer, self.judge_id = scorer, judge_id

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        contexts = [aspect_messages(aspect, item.prompt, item.response) for item in items for aspect in ASPECTS]
        candidates = [str(r) for r in RATINGS]
        if hasattr(self.scorer, "next_token_logprobs"):
            rows = [list(map(float, row)) for row in self.scorer.next_token_logprobs(contexts, candidates)]
        else:
            requests = [(context, c) for context in contexts for c in candidates]
            scores = self.scorer.loglikelihood(requests)
            if len(scores) != len(requests):
                raise RuntimeError(f"loglikelihood returned {len(scores)} scores for {len(requests)} requests")
            width = len(candidates)
            rows = [[float(s[0]) for s in scores[k:k + width]] for k in range(0, len(scores), width)]
        if len(rows) != len(contexts) or any(len(row) != len(candidates) for row in rows):
            raise RuntimeError(f"the scorer returned {len(rows)} score rows for {len(contexts)} aspect prompts")
        out = []
        for i, item in enumerate(items):
            ratings = {}
            for a, aspect in enumerate(ASPECTS):
                best, expected, probs = rating_distribution(rows[i * len(ASPECTS) + a])
                ratings[aspect] = {"rating": best, "expected": round(expected, 6),
                                   "probs": [round(p, 6) for p in probs]}
            out.append(Judgment(item.completion_id, ratings))
        return out


class ChatBackend(Protocol):
    def generate(self, prompts: Sequence[Messages], params: SamplingParams) -> list[list[Any]]: ...


class ChatJudge:
    """Asks a chat model for all four ratings in a strict format; retries, then quarantines (module doc)."""

    def __init__(self, backend: ChatBackend, judge_id: str, params: SamplingParams | None = None,
                 max_retries: int = 2, retry_temperature: float = 0.7):
        self.backend, self.judge_id = backend, judge_id
        self.params = replace(params or SamplingParams(max_new_tokens=64, temperature=0.0), n=1)
        self.max_retries, self.retry_temperature = max_retries, retry_temperature

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        results: dict[str, Judgment] = {}
        raw: dict[str, list[str]] = {item.completion_id: [] for item in items}
        reasons: dict[str, str] = {}
        pending = list(items)
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            params = self.params if attempt == 0 else replace(
                self.params, seed=self.params.seed + attempt * RETRY_SEED_STRIDE,
                temperature=max(self.params.temperature, self.retry_temperature))
            outputs = self.backend.generate([all_aspects_messages(i.prompt, i.response) for i in pending], params)
            still = []
            for item, completions in zip(pending, outputs):
                text = completions[0].text if completions else ""
                raw[item.completion_id].append(text)
                try:
                    ratings = parse_ratings(text)
                except UnparseableJudgment as exc:
                    reasons[item.completion_id] = str(exc)
                    still.append(item)
                    continue
                results[item.completion_id] = Judgment(item.completion_id,
                                                       {a: {"rating": r} for a, r in ratings.items()},
                                                       attempts=attempt + 1, raw=raw[item.completion_id])
            pending = still
        for item in pending:
            results[item.completion_id] = Judgment(
                item.completion_id, None, attempts=self.max_retries + 1, raw=raw[item.completion_id],
                reason=f"unparseable after {self.max_retries + 1} attempts: {reasons[item.completion_id]}")
        return [results[item.completion_id] for item in items]


def read_judge_requests(store: Store, rel: str) -> list[JudgeItem]:
    items = []
    for number, line in enumerate(store.read_bytes(rel).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            items.append(JudgeItem(record["completion_id"], record["prompt"], record["response"]))
        except (ValueError, KeyError, TypeError) as exc:
            expected = '{"completion_id", "prompt", "response"}'
            raise ValueError(f"{rel}:{number}: {exc}; expected {expected}") from exc
    return items


def run_judging(store: Store, requests_rel: str, output_rel: str, judge: Judge, reporter: Any = None,
                batch_size: int = 8) -> dict[str, int]:
    """Judge every request of ``requests_rel`` and write ``output_rel`` (JSONL, one judgment per line,
    atomically). Returns counts: judged, quarantined."""
    items = read_judge_requests(store, requests_rel)
    judgments: list[Judgment] = []
    for batch in batched(items, batch_size):
        judgments.extend(judge.judge(batch))
        if reporter is not None:
            reporter.log(f"judged {len(judgments)}/{len(items)} completions")
    store.write_jsonl(output_rel, ({**j.to_json(), "judge_id": judge.judge_id} for j in judgments))
    quarantined = sum(j.ratings is None for j in judgments)
    return {"judged": len(judgments) - quarantined, "quarantined": quarantined}
