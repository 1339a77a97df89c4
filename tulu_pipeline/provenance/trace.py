"""A row's trace, summarized per stage and drawn as a tree for people.

`summarize` turns the raw events of `Ledger.trace` into one entry per stage decision. Every stage is
a list (a row can pass through several versions of a stage: a re-curation with another config, two
mixes, three checkpoints), ordered by time, and every entry names the asset version and the Dagster
run that made the decision::

    source           ingested (file, line or record index, file sha256, license) or quarantined
    normalization    changed (with the changes) / unchanged / dropped (with the reason)
    dedup            kept / dropped_duplicate (exact or near, duplicate_of the kept row)
    decontamination  clean / contaminated (each matched benchmark item: eval id, eval row, score, span)
    mixes            mix name and hash, train or heldout
    preference_pairs pairs built from the row (its own ``paired`` events and pairs that reference it)
    checkpoints      trained (or held out for loss) in which checkpoint, and how many epochs
    other            any event no stage above claims

Events of other rows that name this one (``referenced_by``) are summarized too: rows dropped as its
duplicates, training rows quarantined for overlapping it (when it is an eval item), rows trained into
it (when the id is a checkpoint's). ``status`` says in one line how far the row got.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STAGES = ("source", "normalization", "dedup", "decontamination", "mixes", "preference_pairs", "checkpoints", "other")


def stage_of(event: dict[str, Any]) -> str:
    """Which summary stage an event belongs to."""
    name, stage, asset = event["event"], event.get("stage"), event.get("asset_key")
    if name == "ingested" or stage == "sources":
        return "source"
    if name == "normalized" or asset == "normalized_prompts":
        return "normalization"
    if name == "dropped_duplicate" or asset == "deduplicated_prompts":
        return "dedup"
    if stage == "decontamination" or asset == "decontaminated_prompts":
        return "decontamination"
    if name == "included_in_mix" and (stage in (None, "sft") or asset == "sft_mix"):
        return "mixes"
    if name in ("paired", "selected_for_preference", "not_paired") or stage == "preference":
        return "preference_pairs"
    if name == "included_in_mix":  # an RLVR prompt set (or another stage's selection)
        return "mixes"
    if name in ("trained_on", "evaluated"):
        return "checkpoints"
    return "other"


def _where(event: dict[str, Any]) -> dict[str, Any]:
    return {"asset_key": event["asset_key"], "asset_version": event["asset_version"], "run_id": event["run_id"],
            "ts": event["ts"]}


def _drop_none(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if v is not None}


def _match(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("benchmark", "eval_id", "eval_row_id", "source", "score", "span")}


def _entry(event: dict[str, Any], stage: str) -> dict[str, Any]:
    d = event.get("details") or {}
    related = event.get("related_ids") or []
    if stage == "source":
        entry = {"decision": event["decision"] or event["event"], "source": d.get("source"), "file": d.get("file"),
                 "line": d.get("line"), "record_index": d.get("record_index"), "source_key": d.get("source_key"),
                 "file_sha256": d.get("file_sha256"), "license": d.get("license"), "eval_id": d.get("eval_id"),
                 "reason": event.get("reason")}
    elif stage == "normalization":
        decision = event["decision"] if event["event"] == "normalized" else "dropped"
        entry = {"decision": decision, "changes": d.get("changes"), "reason": event.get("reason")}
    elif stage == "dedup":
        dropped = event["event"] == "dropped_duplicate"
        entry = {"decision": "dropped_duplicate" if dropped else "kept", "kind": event["decision"],
                 "duplicate_of": related[0] if dropped and related else None, "jaccard": d.get("jaccard"),
                 "reason": event.get("reason") if dropped else None}
    elif stage == "decontamination":
        contaminated = event["event"] == "quarantined"
        entry = {"decision": "contaminated" if contaminated else (event["decision"] or "clean"),
                 "matches": [_match(m) for m in d.get("matches", [])] if contaminated else None,
                 "reason": event.get("reason") if contaminated else None,
                 "ngram": d.get("ngram"), "threshold": d.get("threshold")}
    elif stage == "mixes":
        entry = {"decision": event["decision"], "mix": d.get("mix") or event["asset_key"],
                 "mix_hash": d.get("mix_hash") or event["asset_version"], "stage": d.get("stage")}
    elif stage == "checkpoints":
        entry = {"decision": event["decision"], "event": event["event"],
                 "checkpoint": d.get("checkpoint") or (related[0] if related else None),
                 "mix_hash": d.get("mix_hash"), "epochs": d.get("epochs")}
    elif stage == "preference_pairs":
        entry = {"decision": event["decision"], "row_id": event["row_id"], "related_ids": related, "details": d or None}
    else:
        entry = {"event": event["event"], "decision": event["decision"], "reason": event.get("reason"),
                 "related_ids": related or None, "details": d or None}
    return {**_drop_none(entry), **_where(event)}


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """Per-stage decisions, key facts and run ids of a `Ledger.trace` result, plus a one-line status."""
    row_id = trace["row_id"]
    summary: dict[str, Any] = {stage: [] for stage in STAGES}
    for event in trace["events"]:
        stage = stage_of(event)
        summary[stage].append(_entry(event, stage))

    duplicates, contaminated, trained_rows = [], [], Counter()
    referenced = Counter(e["event"] for e in trace["referenced_by"])
    for event in trace["referenced_by"]:
        d = event.get("details") or {}
        if event["event"] == "dropped_duplicate":
            duplicates.append({"row_id": event["row_id"], "kind": event["decision"], "jaccard": d.get("jaccard"),
                               **_where(event)})
        elif event["event"] == "quarantined" and event.get("stage") == "decontamination":
            for m in d.get("matches", []):
                if m.get("eval_row_id") == row_id:
                    contaminated.append({"row_id": event["row_id"], **_match(m), **_where(event)})
        elif event["event"] == "paired":
            summary["preference_pairs"].append({**_entry(event, "preference_pairs"), "via": "referenced_by"})
        elif event["event"] in ("trained_on", "evaluated"):
            trained_rows[(event["event"], event["asset_version"], event["run_id"])] += 1
    summary["duplicates_dropped"] = [_drop_none(d) for d in duplicates]
    summary["contaminated_training_rows"] = contaminated
    summary["rows_of_checkpoint"] = [{"event": ev, "rows": n, "asset_version": v, "run_id": r}
                                     for (ev, v, r), n in sorted(trained_rows.items())]
    summary["referenced_by_counts"] = dict(sorted(referenced.items()))
    summary["run_ids"] = {stage: sorted({e["run_id"] for e in summary[stage]}) for stage in STAGES if summary[stage]}
    summary["status"] = _status(trace, summary)
    return summary


def _status(trace: dict[str, Any], s: dict[str, Any]) -> str:
    if not trace["found"]:
        if s["rows_of_checkpoint"]:
            n = sum(r["rows"] for r in s["rows_of_checkpoint"] if r["event"] == "trained_on")
            return f"not a row: checkpoint id with {n} trained rows"
        return "unknown row" if not trace["referenced_by"] else "no events of its own; referenced by other rows"
    trained = sorted({c["checkpoint"] for c in s["checkpoints"] if c["event"] == "trained_on"})
    if trained:
        return "trained on " + ", ".join(trained)
    heldout = sorted({c["checkpoint"] for c in s["checkpoints"]
                      if c["event"] == "evaluated" and c.get("decision") != "scored"})
    if heldout:
        return "held out (measured, not trained) for " + ", ".join(heldout)
    scored = sorted({c["checkpoint"] for c in s["checkpoints"] if c.get("decision") == "scored"})
    if scored:
        return "eval item, evaluated on " + ", ".join(scored)
    if s["mixes"]:
        mixes = ", ".join(f"{m.get('mix')}@{m.get('mix_hash')} ({m['decision']})" for m in s["mixes"])
        return f"in mix {mixes}; not trained on yet"
    for stage, label in (("decontamination", "decontamination"), ("dedup", "dedup"),
                         ("normalization", "normalization"), ("source", "ingestion")):
        if not s[stage]:
            continue
        last = s[stage][-1]
        if stage == "decontamination" and last["decision"] == "contaminated":
            best = last["matches"][0] if last.get("matches") else {}
            return (f"quarantined by decontamination: {best.get('benchmark')} item {best.get('eval_id')} "
                    f"(coverage {score_text(best.get('score'))})")
        if stage == "dedup" and last["decision"] == "dropped_duplicate":
            return f"dropped as {last.get('kind')} duplicate of {last.get('duplicate_of')}"
        if stage == "normalization" and last["decision"] == "dropped":
            return f"quarantined at normalization: {last.get('reason')}"
        if stage == "source" and last["decision"] != "ingested":
            return f"quarantined at ingestion: {last.get('reason')}"
        if stage == "source" and s["contaminated_training_rows"]:
            overlapping = {c["row_id"] for c in s["contaminated_training_rows"]}
            return f"eval item; {len(overlapping)} training rows overlapped it"
        if stage == "decontamination":
            return "clean; in no mix yet"
        return f"passed {label}; no later stage has seen it"
    return "events of other kinds only"


# ---------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------
def score_text(score: Any) -> str:
    """A coverage score for people: three decimals."""
    return f"{score:.3f}" if isinstance(score, (int, float)) else str(score)


def _short(value: str | None, n: int = 12) -> str:
    return "" if value is None else (value if len(value) <= n else value[:n] + "…")


def _at(entry: dict[str, Any]) -> str:
    return f"{entry['asset_key']}@{entry['asset_version']}  run {entry['run_id']}"


def _describe(stage: str, e: dict[str, Any]) -> list[str]:
    """The headline of one entry, then detail lines."""
    if stage == "source":
        where = f"line {e['line']}" if e.get("line") is not None else f"record {e.get('record_index')}"
        head = f"{e['decision']}: {e.get('source')}  {e.get('file')} {where}"
        lines = [f"sha256 {e.get('file_sha256')}  license {e.get('license')}"]
        if e.get("eval_id"):
            lines.append(f"eval item {e['eval_id']}")
        if e.get("reason"):
            lines.append(f"reason: {e['reason']}")
        return [head, *lines]
    if stage == "normalization":
        if e["decision"] == "changed":
            changes = e.get("changes")
            shown = ", ".join(changes) if isinstance(changes, list) and all(isinstance(c, str) for c in changes) \
                else str(changes)
            return [f"changed: {shown}"]
        return [e["decision"] + (f": {e['reason']}" if e.get("reason") else "")]
    if stage == "dedup":
        if e["decision"] == "kept":
            return [f"kept ({e.get('kind')})"]
        return [f"dropped as {e.get('kind')} duplicate of {e.get('duplicate_of')}"
                + (f" (jaccard {e['jaccard']:.3f})" if e.get("jaccard") is not None else "")]
    if stage == "decontamination":
        if e["decision"] != "contaminated":
            return [e["decision"]]
        lines = [f"contaminated: {len(e.get('matches') or [])} benchmark item(s)"]
        for m in e.get("matches") or []:
            lines.append(f"{m['benchmark']} {m['eval_id']} (eval row {m['eval_row_id']}) "
                         f"coverage {score_text(m['score'])}: \"{_short(m.get('span'), 60)}\"")
        return lines
    if stage == "mixes":
        return [f"{e.get('mix')}@{e.get('mix_hash')} ({e['decision']})"]
    if stage == "checkpoints":
        verb = ("trained" if e["event"] == "trained_on" else
                "evaluated (benchmark item)" if e.get("decision") == "scored" else "held out (measured)")
        epochs = f", {e['epochs']} epoch(s)" if e.get("epochs") is not None else ""
        return [f"{e.get('checkpoint')}: {verb}{epochs}"]
    if stage == "preference_pairs":
        via = " (references this row)" if e.get("via") else ""
        return [f"{e.get('decision')} {e.get('row_id')}{via}"]
    return [f"{e.get('event')} {e.get('decision') or ''} {e.get('reason') or ''}".rstrip()]


_LABELS = {"source": "source", "normalization": "normalization", "dedup": "dedup",
           "decontamination": "decontamination", "mixes": "mixes", "preference_pairs": "preference pairs",
           "checkpoints": "checkpoints", "other": "other events"}


def render_tree(trace: dict[str, Any]) -> str:
    """The trace as an indented tree: one branch per stage, each decision with its asset version and run."""
    s = trace.get("summary") or summarize(trace)
    lines = [f"{trace['row_id']}", f"│  status: {s['status']}"]
    branches: list[tuple[str, list[list[str]]]] = []
    for stage in STAGES:
        entries = s[stage]
        if not entries and (stage == "other" or not trace["found"]):
            continue
        branches.append((_LABELS[stage], [[*_describe(stage, e), _at(e)] for e in entries]))
    if s["duplicates_dropped"]:
        branches.append(("rows dropped as its duplicates",
                         [[f"{d['row_id']} ({d['kind']})", f"run {d['run_id']}"] for d in s["duplicates_dropped"]]))
    if s["contaminated_training_rows"]:
        branches.append(("training rows quarantined for overlapping it",
                         [[f"{c['row_id']} coverage {score_text(c['score'])}", f"run {c['run_id']}"]
                          for c in s["contaminated_training_rows"]]))
    if s["rows_of_checkpoint"]:
        branches.append(("rows recorded against this checkpoint",
                         [[f"{r['event']}: {r['rows']} rows", f"run {r['run_id']}"] for r in s["rows_of_checkpoint"]]))
    for i, (label, entries) in enumerate(branches):
        last_branch = i == len(branches) - 1
        lines.append(("└── " if last_branch else "├── ") + label + ("" if entries else ": none"))
        pad = "    " if last_branch else "│   "
        for j, entry in enumerate(entries):
            last_entry = j == len(entries) - 1
            lines.append(pad + ("└── " if last_entry else "├── ") + entry[0])
            for detail in entry[1:]:
                lines.append(pad + ("    " if last_entry else "│   ") + "    " + detail)
    return "\n".join(lines)
