"""What changed between two checkpoints (`tulu diff CKPT_A CKPT_B`, the ``checkpoint_diff`` asset).

- **Data**: the rows each was trained on (its ``trained_on`` ledger events), per source added and removed;
  the rows whose curation or selection decisions differ between the two data lineages (each decision read
  from the ledger events of the dataset versions that checkpoint's data descends from: normalization,
  deduplication, decontamination, the mix, preference pairing); licenses added and removed; benchmarks one
  was decontaminated against and the other not.
- **Training**: hyperparameters, code and library versions, base weights and template lineage that differ.
- **Evaluation**, for every benchmark both were evaluated on: the score delta over the items both saw with a
  seeded paired-bootstrap 95% interval (resampling items, not the two scores separately), and the items that
  flipped (right → wrong and back), each with the training rows that overlap it most (the decontamination
  n-gram matches the ledger recorded) and whether either checkpoint trained on them.

`checkpoint_diff(store, a, b)` returns JSON-able data; `diff_markdown` renders it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from tulu_pipeline.audit.reports import checkpoint_bill, eval_audit, load_checkpoint_manifest
from tulu_pipeline.data.coverage import dataset_refs
from tulu_pipeline.evaluation.results import item_scores, read_summary
from tulu_pipeline.evaluation.scoring import bootstrap_ci
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import INFO_FILE
from tulu_pipeline.plots import markdown_table
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import Store
from tulu_pipeline.templates.lineage import lineage_hashes

# Ledger events that are decisions about a row before any training (what `decisions differ` compares).
DECISION_EVENTS = ("normalized", "quarantined", "dropped_duplicate", "kept", "included_in_mix", "paired",
                   "selected_for_preference")
RIGHT = 0.5  # an item scoring at least this is counted right (scores are 0/1 on most benchmarks)
TOP_OVERLAPS = 3


def source_of(row_id: str) -> str:
    """A row id is ``<source>-<hash>`` (`tulu_pipeline.data.schema`)."""
    return row_id.rsplit("-", 1)[0]


def trained_rows(store: Store, checkpoint_id: str) -> set[str]:
    """Rows the checkpoint was trained on, from its ``trained_on`` ledger events."""
    rows = Ledger(store).query("SELECT DISTINCT row_id FROM events WHERE event = 'trained_on' "
                               "AND list_contains(related_ids, ?)", [checkpoint_id], related_to=checkpoint_id)
    return {r["row_id"] for r in rows}


def data_versions(store: Store, manifest: dict[str, Any]) -> set[str]:
    """Every dataset version a checkpoint's training data descends from (its mix and their inputs, transitively)."""
    refs = list(dataset_refs(manifest))
    if manifest.get("mix_hash"):
        refs.append(("sft_mix", manifest["mix_hash"]))
    seen: set[tuple[str, str]] = set()
    while refs:
        name, version = refs.pop()
        if (name, version) in seen:
            continue
        seen.add((name, version))
        info = f"{store.dataset_dir(name, version)}/_dataset.json"
        if store.exists(info):
            refs.extend(dataset_refs(store.read_json(info)))
    return {version for _name, version in seen}


def _decisions(store: Store, row_ids: set[str], versions_a: set[str], versions_b: set[str]) -> dict[str, Any]:
    """Per row: ``{stage/event: decision}`` under each checkpoint's data versions, for the rows where they differ."""
    if not row_ids:
        return {}
    versions = sorted(versions_a | versions_b)
    marks = ", ".join("?" for _ in DECISION_EVENTS)
    vmarks = ", ".join("?" for _ in versions)
    events = Ledger(store).query(
        f"SELECT row_id, stage, event, decision, asset_version FROM events WHERE event IN ({marks}) "
        f"AND asset_version IN ({vmarks})", [*DECISION_EVENTS, *versions], row_ids=sorted(row_ids))
    per: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: {"a": {}, "b": {}})
    for e in events:
        for side, chosen in (("a", versions_a), ("b", versions_b)):
            if e["asset_version"] in chosen:
                per[e["row_id"]][side][f'{e["stage"]}/{e["event"]}'] = e["decision"] or e["event"]
    differing = {}
    for row_id in sorted(row_ids):
        a, b = per[row_id]["a"], per[row_id]["b"]
        if a != b:
            keys = sorted(set(a) | set(b))
            differing[row_id] = {k: {"a": a.get(k, "absent"), "b": b.get(k, "absent")} for k in keys
                                 if a.get(k) != b.get(k)}
    return differing


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _training_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    code = {k: v for k, v in manifest.items() if k.endswith("code_version") or k == "format_version"}
    return {"code": code, "libraries": manifest.get("versions") or {},
            "base_model_sha256": manifest.get("base_model_sha256") or manifest.get("start_model_sha256"),
            "template_lineage": lineage_hashes(manifest.get("template_lineage")), "preset": manifest.get("preset")}


def _overlaps(store: Store, benchmark: str, trained_a: set[str], trained_b: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Eval item id (registry row id and benchmark id) -> training rows that overlapped it, best first."""
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in eval_audit(store, benchmark)["rows"]:
        for hit in row["stopped_at"]:
            entry = {"row_id": row["row_id"], "source_key": row["source_key"], "score": hit["score"],
                     "stopped_at": f"decontamination@{hit['asset_version']}",
                     "trained_in_a": row["row_id"] in trained_a, "trained_in_b": row["row_id"] in trained_b}
            for key in {hit.get("eval_row_id"), hit.get("eval_id")} - {None}:
                by_item[key].append(entry)
    return {k: sorted(v, key=lambda e: -(e["score"] or 0))[:TOP_OVERLAPS] for k, v in by_item.items()}


def _evaluations(store: Store, a: str, b: str, trained_a: set[str], trained_b: set[str],
                 resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    out = []
    for benchmark in sorted(store.listdir("reports/eval")):
        sa, sb = read_summary(store, benchmark, a), read_summary(store, benchmark, b)
        if sa is None or sb is None:
            continue
        if "pairwise_vs_parent" in (sa.get("kind"), sb.get("kind")):
            continue  # each score is a win rate against that checkpoint's own parent: not comparable item by item
        scores_a, scores_b = item_scores(store, benchmark, a, sa), item_scores(store, benchmark, b, sb)
        common = sorted(set(scores_a) & set(scores_b))
        deltas = [scores_b[i] - scores_a[i] for i in common]
        low, high = bootstrap_ci(deltas, resamples, seed)
        flips = [{"item_id": i, "a": scores_a[i], "b": scores_b[i],
                  "direction": "right→wrong" if scores_a[i] >= RIGHT else "wrong→right"}
                 for i in common if (scores_a[i] >= RIGHT) != (scores_b[i] >= RIGHT)]
        if flips:
            overlaps = _overlaps(store, benchmark, trained_a, trained_b)
            for flip in flips:
                flip["overlapping_training_rows"] = overlaps.get(flip["item_id"], [])
        out.append({"benchmark": benchmark, "items": len(common), "score_a": sa.get("score"), "score_b": sb.get("score"),
                    "delta": sum(deltas) / len(deltas) if deltas else None, "ci_low": low, "ci_high": high,
                    "flipped": flips})
    return out


def _manifest_and_bill(store: Store, checkpoint_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's manifest and data bill; an untrained model (``base_model``) has neither rows nor a bill."""
    info = f"models/{checkpoint_id}/{INFO_FILE}"
    if not store.exists(f"models/{checkpoint_id}/{MANIFEST_FILE}") and store.exists(info):
        return {"base_model_sha256": store.read_json(info).get("weights_sha256")}, {"licenses": [], "decontamination": None}
    return load_checkpoint_manifest(store, checkpoint_id), checkpoint_bill(store, checkpoint_id)


def checkpoint_diff(store: Store, a: str, b: str) -> dict[str, Any]:
    """Checkpoint ``b`` against checkpoint ``a`` (see the module docstring); either may be the untrained base model."""
    (manifest_a, bill_a), (manifest_b, bill_b) = _manifest_and_bill(store, a), _manifest_and_bill(store, b)
    rows_a, rows_b = trained_rows(store, a), trained_rows(store, b)
    per_source: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"added": [], "removed": []})
    for row_id in sorted(rows_b - rows_a):
        per_source[source_of(row_id)]["added"].append(row_id)
    for row_id in sorted(rows_a - rows_b):
        per_source[source_of(row_id)]["removed"].append(row_id)
    licenses_a = {e["license"] for e in bill_a["licenses"]}
    licenses_b = {e["license"] for e in bill_b["licenses"]}
    bench_a = set(((bill_a.get("decontamination") or {}).get("benchmarks")) or {})
    bench_b = set(((bill_b.get("decontamination") or {}).get("benchmarks")) or {})
    decisions = _decisions(store, rows_a | rows_b, data_versions(store, manifest_a), data_versions(store, manifest_b))
    return {
        "a": a, "b": b,
        "rows": {"a": len(rows_a), "b": len(rows_b), "added": len(rows_b - rows_a), "removed": len(rows_a - rows_b),
                 "per_source": [{"source": s, "added": len(v["added"]), "removed": len(v["removed"]),
                                 "added_row_ids": v["added"], "removed_row_ids": v["removed"]}
                                for s, v in sorted(per_source.items())]},
        "decisions_differ": [{"row_id": r, "decisions": d} for r, d in decisions.items()],
        "licenses": {"added": sorted(licenses_b - licenses_a), "removed": sorted(licenses_a - licenses_b)},
        "decontaminated_against": {"only_a": sorted(bench_a - bench_b), "only_b": sorted(bench_b - bench_a)},
        "hyperparameters": _changed(manifest_a.get("config") or {}, manifest_b.get("config") or {}),
        "code_and_inputs": _changed(_training_identity(manifest_a), _training_identity(manifest_b)),
        "evaluations": _evaluations(store, a, b, rows_a, rows_b),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def diff_markdown(diff: dict[str, Any]) -> str:
    """The diff as a markdown report."""
    r = diff["rows"]
    lines = [f"## `{diff['b']}` vs `{diff['a']}`",
             f"Training rows: {r['a']} → {r['b']} ({r['added']} added, {r['removed']} removed)."]
    if r["per_source"]:
        lines.append(markdown_table([{k: s[k] for k in ("source", "added", "removed")} for s in r["per_source"]],
                                    ["source", "added", "removed"]))
    changed = diff["decisions_differ"]
    lines.append(f"### Decisions that differ ({len(changed)} rows)")
    if changed:
        table = [{"row": c["row_id"], "decisions (a → b)": "; ".join(f"{k}: {v['a']} → {v['b']}"
                                                                       for k, v in c["decisions"].items())}
                 for c in changed[:50]]
        lines.append(markdown_table(table, ["row", "decisions (a → b)"], max_chars=120))
    lic, dec = diff["licenses"], diff["decontaminated_against"]
    lines.append("### Licenses and decontamination")
    lines.append(f"Licenses added: {', '.join(lic['added']) or 'none'}; removed: {', '.join(lic['removed']) or 'none'}. "
                 f"Decontaminated against only in a: {', '.join(dec['only_a']) or 'none'}; only in b: "
                 f"{', '.join(dec['only_b']) or 'none'}.")
    for title, key in (("Hyperparameters that differ", "hyperparameters"), ("Code, inputs and template", "code_and_inputs")):
        lines.append(f"### {title}")
        lines.append(markdown_table([{"key": c["key"], "a": json.dumps(c["a"]), "b": json.dumps(c["b"])}
                                     for c in diff[key]], ["key", "a", "b"], max_chars=60) if diff[key] else "none")
    lines.append("### Evaluations (b − a, ×100, paired bootstrap 95% interval over shared items)")
    if not diff["evaluations"]:
        lines.append("No benchmark was evaluated on both.")
    for e in diff["evaluations"]:
        lines.append(f"- **{e['benchmark']}**: {_pct(e['delta'])} [{_pct(e['ci_low'])}, {_pct(e['ci_high'])}] over "
                     f"{e['items']} items; {len(e['flipped'])} flipped")
        for f in e["flipped"]:
            rows = ", ".join(f"{o['row_id']} ({o['score']:.2f}, trained in a: {o['trained_in_a']}, b: {o['trained_in_b']})"
                             for o in f["overlapping_training_rows"]) or "no overlapping training row"
            lines.append(f"  - `{f['item_id']}` {f['direction']}; overlapping rows: {rows}")
    return "\n\n".join(lines)
