"""The bundled human preference data as pairs: HH-RLHF harmless-base and FineGrainedRLHF QA-Feedback.

Both arrive as rows of the decontaminated pool (so only rows that passed decontamination are used):

- HH-RLHF rows end on the user turn; the loader keeps the chosen and rejected final replies in
  ``extra`` (``rejected_messages`` when the rejected transcript's earlier turns differ). A few
  transcripts write a turn as ``"  Human: …"`` without the blank line the format requires, and some
  turns start with a stray ``Human:``; the loader cannot split them, so the turns hold another speaker's
  words. Those rows are quarantined (reason ``hh_speaker_marker_inside_turn``), as are pairs whose two
  transcripts differ before the final reply or whose replies are identical or empty.
- FineGrainedRLHF rows hold four predictions and ``preference``: six pairwise human judgments in the
  order (1,2), (1,3), (1,4), (2,3), (2,4), (3,4), each 1 (first better), 2 (second better) or 0 (tie)
  (the order of ``create_comp_rm_files.py`` in allenai/FineGrainedRLHF). A prediction's rating is its
  net wins; chosen is a best one, rejected one that chosen beats directly (both picked by seeded hash);
  a row where no prediction beats another is a tie and is quarantined.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import combinations
from typing import Any

from tulu_pipeline.preference.prompts import rank_key
from tulu_pipeline.preference.schema import prompt_messages

HH_SOURCE = "hh_rlhf_harmless"
FG_SOURCE = "fine_grained_rlhf_qa"
FG_PREDICTIONS = ("prediction 1", "prediction 2", "prediction 3", "prediction 4")
FG_PAIRS = list(combinations(range(len(FG_PREDICTIONS)), 2))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
_SPEAKER = re.compile(r"(?:^|\s)(Human|Assistant):")


class HumanPairProblem(ValueError):
    """A human preference row that cannot become a pair; ``code`` is a stable reason id."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


def human_judge_id(source: str) -> str:
    return f"human:{source}"


def _extra(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(row.get("extra") or "{}")
    except json.JSONDecodeError as exc:
        raise HumanPairProblem("bad_extra", f"extra is not JSON ({exc.msg})") from exc


def _base(row: Mapping[str, Any]) -> dict[str, Any]:
    split = prompt_messages(row["messages"])
    if split is None:
        raise HumanPairProblem("no_prompt", "no non-empty user turn")
    prompt, _ = split
    return {"prompt_row_id": row["row_id"], "source": row["source"], "license": row["license"], "prompt": prompt,
            "origin": "human", "judge_id": human_judge_id(row["source"])}


def _check_texts(chosen: str, rejected: str) -> None:
    if not chosen.strip() or not rejected.strip():
        raise HumanPairProblem("empty_response", "chosen or rejected reply is empty")
    if chosen.strip() == rejected.strip():
        raise HumanPairProblem("identical_responses", "chosen and rejected replies are the same text")


def hh_pair(row: Mapping[str, Any]) -> dict[str, Any]:
    """The pair of an HH-RLHF row (fields of `PAIR_SCHEMA` but pair_id and split), or `HumanPairProblem`."""
    extra = _extra(row)
    if "chosen" not in extra or "rejected" not in extra:
        raise HumanPairProblem("missing_replies", "extra lacks the chosen/rejected replies")
    chosen, rejected = extra["chosen"], extra["rejected"]
    for i, text in enumerate([m["content"] for m in row["messages"]] + [chosen, rejected]):
        match = _SPEAKER.search(text)
        if match:
            where = f"turn {i}" if i < len(row["messages"]) else ("chosen" if i == len(row["messages"]) else "rejected")
            raise HumanPairProblem("hh_speaker_marker_inside_turn",
                                   f"{where} contains {match.group(1)!r}: the transcript was not split at every "
                                   "turn (a marker without its blank line), so turns mix speakers")
    if row["messages"][-1]["role"] != "user":
        raise HumanPairProblem("not_ending_on_user", "the conversation must end on the user turn")
    if extra.get("rejected_messages"):
        raise HumanPairProblem("different_conversations",
                               "the rejected transcript's earlier turns differ from the chosen one's")
    _check_texts(chosen, rejected)
    ratings = {"scheme": "hh_rlhf_binary", "chosen": {"preferred": 1}, "rejected": {"preferred": 0}}
    return {**_base(row), "chosen": chosen, "rejected": rejected, "chosen_model": "hh_rlhf:unknown_model",
            "rejected_model": "hh_rlhf:unknown_model", "chosen_rating": 1.0, "rejected_rating": 0.0,
            "ratings": json.dumps(ratings, sort_keys=True),
            "extra": json.dumps({"source_key": row["source_key"]}, sort_keys=True)}


def fg_net_wins(preference: list[int]) -> list[int]:
    """Net wins (wins − losses) of each of the four predictions from the six pairwise judgments."""
    valid = isinstance(preference, list) and len(preference) == len(FG_PAIRS)
    if not valid or any(p not in (0, 1, 2) for p in preference):
        raise HumanPairProblem("bad_preference", f"preference must be 6 values in {{0, 1, 2}}, got {preference!r}")
    net = [0] * len(FG_PREDICTIONS)
    for (a, b), p in zip(FG_PAIRS, preference):
        if p == 1:
            net[a], net[b] = net[a] + 1, net[b] - 1
        elif p == 2:
            net[a], net[b] = net[a] - 1, net[b] + 1
    return net


def _beats(preference: list[int], winner: int, loser: int) -> bool:
    a, b = sorted((winner, loser))
    p = preference[FG_PAIRS.index((a, b))]
    return (p == 1 and winner == a) or (p == 2 and winner == b)


def fg_pair(row: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The pair of a FineGrainedRLHF row (see the module doc), or `HumanPairProblem`."""
    extra = _extra(row)
    texts = [extra.get(name) for name in FG_PREDICTIONS]
    if not all(isinstance(t, str) for t in texts):
        raise HumanPairProblem("missing_predictions", f"extra lacks one of {FG_PREDICTIONS}")
    preference = extra.get("preference")
    net = fg_net_wins(preference)
    best = max(net)
    tops = [i for i in range(len(texts)) if net[i] == best]
    def key(tag: str):
        return lambda i: rank_key(seed, row["row_id"], tag, FG_PREDICTIONS[i])

    chosen = min(tops, key=key("chosen"))
    beaten = [i for i in range(len(texts)) if i != chosen and _beats(preference, chosen, i)
              and texts[i].strip() != texts[chosen].strip()]
    if not beaten:
        raise HumanPairProblem("tie", f"no prediction is judged worse than the best (net wins {net})")
    rejected = min(beaten, key=key("rejected"))
    _check_texts(texts[chosen], texts[rejected])
    ratings = {"scheme": "finegrained_pairwise_net_wins", "preference": preference,
               "net_wins": dict(zip(FG_PREDICTIONS, net)),
               "chosen": {"field": FG_PREDICTIONS[chosen], "net_wins": net[chosen]},
               "rejected": {"field": FG_PREDICTIONS[rejected], "net_wins": net[rejected]}}
    return {**_base(row), "chosen": texts[chosen], "rejected": texts[rejected],
            "chosen_model": f"fine_grained_rlhf:{FG_PREDICTIONS[chosen]}",
            "rejected_model": f"fine_grained_rlhf:{FG_PREDICTIONS[rejected]}",
            "chosen_rating": float(net[chosen]), "rejected_rating": float(net[rejected]),
            "ratings": json.dumps(ratings, sort_keys=True),
            "extra": json.dumps({"source_key": row["source_key"], "chosen_field": FG_PREDICTIONS[chosen],
                                 "rejected_field": FG_PREDICTIONS[rejected], "passages_omitted": True},
                                sort_keys=True)}


HUMAN_PAIR_BUILDERS = {HH_SOURCE: lambda row, seed: hh_pair(row), FG_SOURCE: fg_pair}


def human_pair(row: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The pair of a row of any supported human preference source."""
    builder = HUMAN_PAIR_BUILDERS.get(row["source"])
    if builder is None:
        raise ValueError(f"{row['source']!r} is not a human preference source; known: {sorted(HUMAN_PAIR_BUILDERS)}")
    return builder(row, seed)


def expected_human_texts(row: Mapping[str, Any]) -> set[str]:
    """Every reply text a pair of this row may use (for the same-prompt check)."""
    extra = _extra(row)
    if row["source"] == HH_SOURCE:
        return {extra.get("chosen"), extra.get("rejected")} - {None}
    return {extra.get(name) for name in FG_PREDICTIONS} - {None}
