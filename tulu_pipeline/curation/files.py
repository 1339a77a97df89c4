"""Decontaminate a JSONL file outside Dagster (`tulu decontam`).

Input lines are JSON objects with ``id`` and either ``messages`` ([{role, content}]) or ``prompt``
(plus an optional ``response``). Outputs, published together only when the whole file succeeded:
``clean.jsonl`` (the input objects that passed, unchanged), ``quarantine.jsonl`` (id, benchmark,
eval_id, score, span, every match) and ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tulu_pipeline.curation.decontaminate import (
    RULE_VERSION, DecontamConfig, EvalIndex, EvalItem, eval_items_from_rows, registry_eval_items, training_turns,
)
from tulu_pipeline.data.loaders import SourceRecordError, iter_jsonl_records, iter_source_rows
from tulu_pipeline.data.registry import registry
from tulu_pipeline.data.schema import ROLES


def _row_from_object(obj: Any, file: str, line: int) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SourceRecordError(file, line, f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise SourceRecordError(file, line, "expected an 'id' (string or integer)")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        ):
            raise SourceRecordError(file, line, f"'messages' must be a non-empty list of {{role, content}} with role in {ROLES}")
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
        if obj.get("response") is not None:
            if not isinstance(obj["response"], str):
                raise SourceRecordError(file, line, "'response' must be a string")
            messages.append({"role": "assistant", "content": obj["response"]})
    else:
        raise SourceRecordError(file, line, "expected 'messages' ([{role, content}]) or a string 'prompt'")
    return {"row_id": str(obj["id"]), "source": Path(file).stem, "messages": messages}


def read_jsonl_rows(path: Path, bad: list[dict[str, Any]] | None = None) -> Iterator[tuple[dict, dict]]:
    """(row, original object) per line; a bad line raises, or is appended to ``bad`` when given."""
    with open(path, "rb") as handle:
        for record in iter_jsonl_records(handle, str(path)):
            try:
                if isinstance(record, SourceRecordError):
                    raise record
                yield _row_from_object(record.value, str(path), record.line), record.value
            except SourceRecordError as exc:
                if bad is None:
                    raise
                bad.append({"line": exc.line, "reason": exc.reason, "raw": record.raw.decode("utf-8", "replace")})


def load_eval_items(evals: str | None) -> list[EvalItem]:
    """Eval items for ``--evals``: the bundled registry (default), a directory of JSONL files (one
    benchmark per file, named by its stem), or comma-separated benchmark, source or suite names."""
    if not evals:
        return registry_eval_items()
    path = Path(evals)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: no *.jsonl eval files in this directory")
        items: list[EvalItem] = []
        for file in files:
            rows = (row for row, _ in read_jsonl_rows(file))
            items.extend(eval_items_from_rows(({**r, "eval_id": r["row_id"]} for r in rows), file.stem))
        return items
    names = [n.strip() for n in evals.split(",") if n.strip()]
    specs = [s for s in registry() if s.role == "eval"]
    chosen = [s for s in specs if s.benchmark in names or s.id in names or s.suite in names]
    known = {s.benchmark for s in specs} | {s.id for s in specs} | {"dev", "unseen"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown evals {unknown}: give a directory, or names among {sorted(known)}")
    items = []
    for spec in chosen:
        items.extend(eval_items_from_rows(iter_source_rows(spec), spec.benchmark))
    return items


def decontaminate_file(train: Path, out_dir: Path, config: DecontamConfig, evals: str | None = None,
                       skip_bad: bool = False) -> dict[str, Any]:
    """Decontaminate ``train`` and publish clean, quarantine and report files into ``out_dir``."""
    items = load_eval_items(evals)
    index = EvalIndex.build(items, ngram=config.ngram, min_item_tokens=config.min_item_tokens)
    bad: list[dict[str, Any]] | None = [] if skip_bad else None
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".decontam-", dir=out_dir))
    counts: Counter[str] = Counter()
    items_hit: dict[str, set[str]] = defaultdict(set)
    rows_in = removed = 0
    try:
        with open(staging / "clean.jsonl", "w", encoding="utf-8") as clean, \
                open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
            batch: list[tuple[dict, dict]] = []

            def flush() -> None:
                nonlocal removed
                turns = [training_turns(row, config.include_response) for row, _ in batch]
                results = index.match_texts(["\n".join(t) for t in turns], config.threshold, config.rule,
                                            config.short_items, turns)
                for (row, obj), matches in zip(batch, results):
                    if not matches:
                        clean.write(json.dumps(obj, ensure_ascii=False) + "\n")
                        continue
                    removed += 1
                    best = matches[0]
                    for benchmark in {m.benchmark for m in matches}:
                        counts[benchmark] += 1
                    for m in matches:
                        items_hit[m.benchmark].add(m.eval_id)
                    quarantine.write(json.dumps({
                        "id": obj["id"], "benchmark": best.benchmark, "eval_id": best.eval_id, "rule": config.rule,
                        "score": best.score, "span": best.span, "spans": list(best.spans), "matches": [asdict(m) for m in matches],
                    }, ensure_ascii=False) + "\n")
                batch.clear()

            for pair in read_jsonl_rows(train, bad):
                rows_in += 1
                batch.append(pair)
                if len(batch) >= 4096:
                    flush()
            flush()
            for entry in bad or []:
                quarantine.write(json.dumps({"id": None, "line": entry["line"], "reason": entry["reason"],
                                             "raw": entry["raw"]}, ensure_ascii=False) + "\n")
        report = {
            "train": str(train), "rows_in": rows_in, "rows_clean": rows_in - removed, "rows_quarantined": removed,
            "bad_lines": len(bad or []), "config": config.model_dump(), "rule_version": RULE_VERSION, "eval_items": len(index.items),
            "benchmarks": {b: {"items": n, "rows_removed": counts[b], "items_hit": len(items_hit[b]),
                               "share_items_hit": round(len(items_hit[b]) / n, 6) if n else 0.0}
                           for b, n in sorted(index.benchmarks.items())},
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        for name in ("clean.jsonl", "quarantine.jsonl", "report.json"):
            os.replace(staging / name, out_dir / name)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
