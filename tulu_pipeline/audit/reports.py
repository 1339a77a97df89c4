"""Audits over the ledger and the store: benchmark exposure, a checkpoint's data bill, dataset licenses.

- `eval_audit(store, benchmark, item_id=None)`: every training row that ever overlapped a benchmark
  (or one item of it), where each was stopped, and whether any still reached a mix or a checkpoint.
- `checkpoint_bill(store, checkpoint_id)` / `bill_markdown(bill)`: what a checkpoint was trained on:
  sources with row counts, licenses (non-commercial ones flagged), the decontamination status of the
  pool the mix was drawn from, the registry version, mix/config/row-id hashes and code versions.
- `license_audit(store, dataset, version=None)` / `licenses_markdown(audit)`: license counts of any
  published dataset (every row carries its source's ``license``).
- `registry_version()`: a content hash of the packaged source registry and bundle manifest.

All of them read; none writes. Each returns plain JSON-able data, so the CLI prints it and a Dagster
asset can attach it as metadata.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter, defaultdict
from typing import Any

from tulu_pipeline.curation.pipeline import checks_path
from tulu_pipeline.data.coverage import checkpoint_decontaminated_versions, dataset_refs
from tulu_pipeline.data.registry import registry, registry_version
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.mixing.publish import MIX_DATASET, mix_info_path
from tulu_pipeline.mixing.sample import row_ids_hash
from tulu_pipeline.plots import markdown_table
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.provenance.trace import score_text
from tulu_pipeline.storage import Store


DECONTAM_REPORTS = "reports/decontamination"


# ---------------------------------------------------------------------------------------------
# registry and licenses
# ---------------------------------------------------------------------------------------------
def license_is_non_commercial(license: str | None) -> bool:
    """Whether a license string forbids commercial use (CC BY-NC and friends), as `SourceSpec.is_non_commercial`."""
    if not license:
        return False
    return "NC" in license.replace("-", " ").upper().split() or "BY-NC" in license.upper()


def _registry_specs() -> dict[str, Any]:
    return {spec.id: spec for spec in registry()}


def _scan_columns(store: Store, dataset: str, version: str | None, columns: list[str]):
    """Batches (as dicts of lists) of a few columns of a published dataset."""
    import pyarrow.parquet as pq

    info = store.dataset_info(dataset, version)
    for part in info.parts:
        with store.fs.open(store.path(store.dataset_dir(dataset, info.version), part), "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(columns=columns, batch_size=65_536):
                yield batch.to_pydict()


def license_audit(store: Store, dataset: str, version: str | None = None) -> dict[str, Any]:
    """Rows per license (and per source within it) of ``data/<dataset>/<version>`` (default: latest)."""
    info = store.dataset_info(dataset, version)
    by_license: dict[str, Counter[str]] = defaultdict(Counter)
    rows = 0
    for batch in _scan_columns(store, dataset, info.version, ["source", "license"]):
        for source, license in zip(batch["source"], batch["license"]):
            by_license[license][source] += 1
            rows += 1
    licenses = [
        {"license": license, "rows": sum(sources.values()), "non_commercial": license_is_non_commercial(license),
         "sources": dict(sorted(sources.items()))}
        for license, sources in sorted(by_license.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    ]
    non_commercial = [entry for entry in licenses if entry["non_commercial"]]
    return {
        "dataset": dataset, "version": info.version, "rows": rows, "licenses": licenses,
        "non_commercial_rows": sum(entry["rows"] for entry in non_commercial),
        "non_commercial_sources": sorted({s for entry in non_commercial for s in entry["sources"]}),
        "commercial_use_ok": not non_commercial,
    }


def licenses_markdown(audit: dict[str, Any]) -> str:
    rows = [{"license": e["license"], "rows": e["rows"], "non-commercial": "⚠ yes" if e["non_commercial"] else "no",
             "sources": ", ".join(f"{s} ({n})" for s, n in e["sources"].items())} for e in audit["licenses"]]
    verdict = ("No non-commercial rows." if audit["commercial_use_ok"] else
               f"⚠ {audit['non_commercial_rows']} of {audit['rows']} rows are under non-commercial licenses "
               f"(sources: {', '.join(audit['non_commercial_sources'])}).")
    return "\n\n".join([f"## Licenses of `{audit['dataset']}@{audit['version']}` ({audit['rows']} rows)",
                        markdown_table(rows, ["license", "rows", "non-commercial", "sources"], max_chars=120),
                        verdict])


# ---------------------------------------------------------------------------------------------
# decontamination reports
# ---------------------------------------------------------------------------------------------
def decontamination_status(store: Store, version: str) -> dict[str, Any]:
    """Blocking-check verdicts and the benchmarks ``decontaminated_prompts@version`` was checked against."""
    base = posixpath.join(DECONTAM_REPORTS, version)
    checks = store.read_json(checks_path(version))["checks"] if store.exists(checks_path(version)) else None
    report = store.read_json(f"{base}/report.json") if store.exists(f"{base}/report.json") else None
    status: dict[str, Any] = {
        "version": version, "checks": checks,
        "checks_passed": bool(checks) and all(checks.values()),
        "report": f"{base}/report.json" if report else None,
    }
    if report:
        status.update({
            "ngram": report["ngram"], "threshold": report["threshold"],
            "include_response": report["include_response"], "rows_removed": report["rows_removed"],
            "benchmarks": {name: {"suite": b["suite"], "items": b["items"], "items_hit": b["items_hit"]}
                           for name, b in report["benchmarks"].items()},
            "flagged": [{"source": c["source"], "benchmark": c["benchmark"], "share_items_hit": c["share_items_hit"]}
                        for c in report["flagged"]],
        })
    return status


def _reports_covering(store: Store, benchmark: str) -> list[dict[str, Any]]:
    covered = []
    for version in store.listdir(DECONTAM_REPORTS):
        path = posixpath.join(DECONTAM_REPORTS, version, "report.json")
        if not store.exists(path):
            continue
        report = store.read_json(path)
        if benchmark in report.get("benchmarks", {}):
            b = report["benchmarks"][benchmark]
            covered.append({"version": version, "items": b["items"], "items_hit": b["items_hit"],
                            "threshold": report["threshold"], "ngram": report["ngram"]})
    return covered


# ---------------------------------------------------------------------------------------------
# benchmark exposure
# ---------------------------------------------------------------------------------------------
def eval_audit(store: Store, benchmark: str, item_id: str | None = None) -> dict[str, Any]:
    """Training rows that ever overlapped ``benchmark`` (or its item ``item_id``: an eval id or an eval
    row id), where each was stopped, and which mixes and checkpoints any of them reached."""
    ledger = Ledger(store)
    quarantines = ledger.query(
        "SELECT row_id, asset_version, run_id, ts, details FROM events "
        "WHERE event = 'quarantined' AND stage = 'decontamination' AND contains(details, ?) "
        "ORDER BY ts, row_id", [json.dumps(benchmark, ensure_ascii=False)])
    hits: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for q in quarantines:
        for m in json.loads(q["details"]).get("matches", []):
            if m.get("benchmark") != benchmark:
                continue
            if item_id is not None and item_id not in (m.get("eval_id"), m.get("eval_row_id")):
                continue
            hits[q["row_id"]].append({"stage": "decontamination", "decision": "contaminated",
                                      "asset_version": q["asset_version"], "run_id": q["run_id"],
                                      "eval_id": m.get("eval_id"), "eval_row_id": m.get("eval_row_id"),
                                      "score": m.get("score"), "span": m.get("span")})
    later = ledger.query(
        "SELECT row_id, event, stage, asset_key, asset_version, run_id, decision, related_ids, details "
        f"FROM events ORDER BY {_ORDER}", row_ids=list(hits)) if hits else []
    by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in later:
        by_row[event["row_id"]].append(event)

    rows = []
    for row_id in sorted(hits):
        events = by_row[row_id]
        origin = next((json.loads(e["details"]) for e in events if e["event"] == "ingested" and e["details"]), {})
        clean_in = [e["asset_version"] for e in events if e["stage"] == "decontamination" and e["event"] == "kept"]
        mixes = [{"mix": json.loads(e["details"] or "{}").get("mix"), "mix_hash": e["asset_version"],
                  "split": e["decision"], "run_id": e["run_id"]} for e in events if e["event"] == "included_in_mix"]
        checkpoints = [{"checkpoint": (e["related_ids"] or [None])[0], "event": e["event"], "run_id": e["run_id"]}
                       for e in events if e["event"] in ("trained_on", "evaluated")]
        rows.append({
            "row_id": row_id, "source": origin.get("source"), "source_key": origin.get("source_key"),
            "stopped_at": hits[row_id], "clean_in_decontaminated_versions": clean_in, "mixes": mixes,
            "checkpoints": checkpoints,
            "reached_checkpoint": any(c["event"] == "trained_on" for c in checkpoints),
        })
    items: Counter[str] = Counter()  # rows per item, each row counted once per item
    for row_hits in hits.values():
        items.update({h["eval_id"] for h in row_hits})
    exposed = sorted({c["checkpoint"] for r in rows for c in r["checkpoints"] if c["event"] == "trained_on"})
    known = {spec.benchmark for spec in registry() if spec.role == "eval"}
    return {
        "benchmark": benchmark, "item": item_id, "registered_benchmark": benchmark in known,
        "decontaminated_against": _reports_covering(store, benchmark),
        "rows": rows,
        "items_hit": dict(sorted(items.items())),
        "totals": {"rows": len(rows), "items_hit": len(items),
                   "rows_reaching_a_mix": sum(1 for r in rows if r["mixes"]),
                   "rows_reaching_a_checkpoint": sum(1 for r in rows if r["reached_checkpoint"])},
        "checkpoints_exposed": exposed,
    }


_ORDER = "ts, asset_key, seq, run_id, row_id, event"


def eval_audit_markdown(audit: dict[str, Any]) -> str:
    target = f"`{audit['benchmark']}`" + (f" item `{audit['item']}`" if audit["item"] else "")
    t = audit["totals"]
    lines = [f"## Training rows overlapping {target}"]
    if not audit["decontaminated_against"]:
        lines.append("⚠ No decontamination report covers this benchmark: "
                     "no overlap recorded does not mean none exists.")
    else:
        versions = ", ".join(f"`{c['version']}` ({c['items_hit']}/{c['items']} items hit)"
                             for c in audit["decontaminated_against"])
        lines.append(f"Decontaminated against in: {versions}.")
    lines.append(f"{t['rows']} training rows overlapped {t['items_hit']} item(s); {t['rows_reaching_a_mix']} reached "
                 f"a mix and {t['rows_reaching_a_checkpoint']} reached a checkpoint"
                 + (f" (⚠ {', '.join(audit['checkpoints_exposed'])})." if audit["checkpoints_exposed"] else "."))
    table = []
    for r in audit["rows"]:
        best = max(r["stopped_at"], key=lambda h: h["score"] or 0)
        table.append({"row": r["row_id"], "source": r["source_key"], "item": best["eval_id"],
                      "score": score_text(best["score"]),
                      "stopped at": f"decontamination@{best['asset_version']}",
                      "checkpoints": ", ".join(c["checkpoint"] for c in r["checkpoints"]
                                               if c["event"] == "trained_on") or "none"})
    if table:
        lines.append(markdown_table(table, ["row", "source", "item", "score", "stopped at", "checkpoints"]))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the data bill of a checkpoint
# ---------------------------------------------------------------------------------------------
def _canonical_hash(obj: Any) -> str:
    return json_hash(obj, compact=True)


def load_checkpoint_manifest(store: Store, checkpoint_id: str) -> dict[str, Any]:
    path = posixpath.join("models", checkpoint_id, MANIFEST_FILE)
    if not store.exists(path):
        raise FileNotFoundError(f"no checkpoint {checkpoint_id!r} under {store.url} (expected {path})")
    return store.read_json(path)


def checkpoint_bill(store: Store, checkpoint_id: str) -> dict[str, Any]:
    """The data bill of ``models/<checkpoint_id>``: sources and row counts, licenses, decontamination
    status and registry version, mix and config hashes, code versions, and consistency checks."""
    manifest = load_checkpoint_manifest(store, checkpoint_id)
    mix_hash = manifest.get("mix_hash") or manifest.get("mix_version")
    if not mix_hash:
        return _derived_bill(store, checkpoint_id, manifest)
    mix_info = store.read_json(mix_info_path(mix_hash)) if store.exists(mix_info_path(mix_hash)) else {}
    inputs = manifest.get("mix_inputs") or mix_info.get("inputs") or {}
    heldout = set(manifest.get("heldout_row_ids") or mix_info.get("heldout_row_ids") or [])
    dropped = set(manifest.get("dropped_row_ids") or [])
    trained_file = manifest.get("trained_row_ids_file")
    ckpt_dir = f"models/{checkpoint_id}"
    trained: set[str] | None = None
    if trained_file and store.exists(f"{ckpt_dir}/{trained_file}"):
        trained = set(store.read_bytes(f"{ckpt_dir}/{trained_file}").decode().split())
    specs = _registry_specs()

    per_source: dict[str, Counter[str]] = defaultdict(Counter)
    licenses_seen: dict[str, set[str]] = defaultdict(set)
    train_ids: list[str] = []  # rows the checkpoint actually learned from
    mix_train_ids: list[str] = []  # the mix's training split, whatever the trainer reached
    for batch in _scan_columns(store, MIX_DATASET, mix_hash, ["row_id", "source", "license"]):
        for row_id, source, license in zip(batch["row_id"], batch["source"], batch["license"]):
            licenses_seen[source].add(license)
            if row_id in heldout:
                per_source[source]["heldout"] += 1
                continue
            mix_train_ids.append(row_id)
            if row_id in dropped:
                per_source[source]["left_out_too_long"] += 1
            elif trained is not None and row_id not in trained:
                per_source[source]["not_reached"] += 1
            else:
                train_ids.append(row_id)
                per_source[source]["trained"] += 1

    ledger = Ledger(store)
    by_event = {r["event"]: r["n"] for r in ledger.query(
        "SELECT event, count(*) AS n FROM events GROUP BY event", related_to=checkpoint_id)}
    ingest = ledger.query(
        "SELECT json_extract_string(details, '$.source') AS source, "
        "json_extract_string(details, '$.file_sha256') AS file_sha256, count(DISTINCT row_id) AS n "
        "FROM events WHERE event = 'ingested' GROUP BY ALL ORDER BY ALL", row_ids=train_ids)
    shas: dict[str, list[str]] = defaultdict(list)
    for r in ingest:
        shas[r["source"]].append(r["file_sha256"])

    sources = []
    for source in sorted(per_source):
        spec = specs.get(source)
        licenses = sorted(licenses_seen[source])
        sources.append({
            "source": source, "rows": per_source[source]["trained"], "heldout": per_source[source]["heldout"],
            "left_out_too_long": per_source[source]["left_out_too_long"],
            "not_reached": per_source[source]["not_reached"],
            "license": licenses[0] if len(licenses) == 1 else licenses,
            "non_commercial": any(license_is_non_commercial(lic) for lic in licenses),
            "ingested_file_sha256": sorted(shas.get(source, [])),
            "registry_sha256": spec.sha256 if spec else None,
            "upstream": spec.upstream_url or spec.upstream_repo if spec else None,
        })
    licenses: dict[str, dict[str, Any]] = {}
    for s in sources:
        for lic in ([s["license"]] if isinstance(s["license"], str) else s["license"]):
            entry = licenses.setdefault(lic, {"license": lic, "rows": 0, "sources": [],
                                              "non_commercial": license_is_non_commercial(lic)})
            entry["rows"] += s["rows"]
            entry["sources"].append(s["source"])
    non_commercial = [s["source"] for s in sources if s["non_commercial"]]

    decontam_version = inputs.get("decontaminated_prompts")
    config = manifest.get("config")
    rebuilt_hash = row_ids_hash(mix_train_ids)  # the mix's training ids, rows later left out included
    checks = {
        "train_row_ids_hash_matches": rebuilt_hash == manifest.get("train_row_ids_hash")
        if manifest.get("train_row_ids_hash") else None,
        "ledger_trained_on_rows": by_event.get("trained_on", 0),
        "ledger_heldout_rows": by_event.get("evaluated", 0),
        # record_trained_on logs exactly the rows the trainer reports having seen
        "ledger_matches_mix": by_event.get("trained_on", 0) == sum(s["rows"] for s in sources),
        # a source the trainer reached no row of (a short run) has no trained rows to check
        "ingested_files_match_registry": all(
            s["ingested_file_sha256"] == [s["registry_sha256"]] for s in sources if s["registry_sha256"] and s["rows"]),
    }
    return {
        "checkpoint_id": checkpoint_id,
        "rows": sum(s["rows"] for s in sources),
        "heldout_rows": sum(s["heldout"] for s in sources),
        "left_out_too_long": sum(s["left_out_too_long"] for s in sources),
        "not_reached": sum(s["not_reached"] for s in sources),
        "sources": sources,
        "licenses": sorted(licenses.values(), key=lambda e: (-e["rows"], e["license"])),
        "non_commercial_sources": non_commercial,
        "commercial_use_ok": not non_commercial,
        "decontamination": decontamination_status(store, decontam_version) if decontam_version else None,
        "registry": {"version": registry_version(), "at_training": manifest.get("registry_version")},
        "mix": {"name": (manifest.get("mix") or {}).get("name"), "mix_hash": mix_hash,
                "config": manifest.get("mix") or mix_info.get("mix"),
                "config_hash": _canonical_hash(manifest.get("mix") or mix_info.get("mix")),
                "inputs": inputs, "train_row_ids_hash": manifest.get("train_row_ids_hash"),
                "heldout_row_ids_hash": manifest.get("heldout_row_ids_hash")},
        "training": {"preset": manifest.get("preset"), "config_hash": _canonical_hash(config) if config else None,
                     "fingerprint": manifest.get("fingerprint"), "base_model_sha256": manifest.get("base_model_sha256"),
                     "seed": manifest.get("seed")},
        "code": {"sft_code_version": manifest.get("sft_code_version"), "format_version": manifest.get("format_version"),
                 "libraries": manifest.get("versions")},
        "checks": checks,
    }


# Datasets a later stage trains on, and the column holding the ledger row id of each of their rows.
DERIVED_DATASETS = {"preference_pairs": "prompt_row_id", "rlvr_prompts": "row_id"}
PARENT_KEYS = ("start_checkpoint", "reference_checkpoint")


def _derived_bill(store: Store, checkpoint_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The bill of a checkpoint trained on pairs (DPO) or prompts (RLVR) from another checkpoint: its own rows,
    counted from the ledger, plus everything its start checkpoint learned from (licenses are inherited)."""
    refs = [(n, v) for n, v in dataset_refs(manifest) if n in DERIVED_DATASETS]
    if not refs:
        raise ValueError(f"checkpoint {checkpoint_id!r}: training_manifest.json names no training data "
                         f"(a mix, or one of {sorted(DERIVED_DATASETS)} with its version)")
    name, version = refs[0]
    id_column = DERIVED_DATASETS[name]
    ledger = Ledger(store)
    decided = ledger.query("SELECT row_id, event FROM events WHERE list_contains(related_ids, ?)",
                           [checkpoint_id], related_to=checkpoint_id)
    trained = {r["row_id"] for r in decided if r["event"] == "trained_on"}
    heldout = {r["row_id"] for r in decided if r["event"] == "evaluated"}
    per_source: dict[str, Counter[str]] = defaultdict(Counter)
    licenses_seen: dict[str, set[str]] = defaultdict(set)
    in_dataset: set[str] = set()
    for row in store.iter_rows(name, version):
        row_id, source = row[id_column], row["source"]
        in_dataset.add(row_id)
        licenses_seen[source].add(row["license"])
        kind = "trained" if row_id in trained else "heldout" if row_id in heldout else "not_reached"
        per_source[source][kind] += 1
    specs = _registry_specs()
    sources = [{"source": source, "rows": c["trained"], "heldout": c["heldout"], "left_out_too_long": 0,
                "not_reached": c["not_reached"], "license": sorted(licenses_seen[source])[0]
                if len(licenses_seen[source]) == 1 else sorted(licenses_seen[source]),
                "non_commercial": any(license_is_non_commercial(lic) for lic in licenses_seen[source]),
                "ingested_file_sha256": [], "registry_sha256": specs[source].sha256 if source in specs else None,
                "upstream": None, "stage": name} for source, c in sorted(per_source.items())]

    parent_id = next((manifest[k] for k in PARENT_KEYS if isinstance(manifest.get(k), str)), None)
    parent = checkpoint_bill(store, parent_id) if parent_id and store.exists("models", parent_id, MANIFEST_FILE) else None
    licenses: dict[str, dict[str, Any]] = {}
    for entry in [*sources, *(parent["sources"] if parent else [])]:
        for lic in ([entry["license"]] if isinstance(entry["license"], str) else entry["license"]):
            item = licenses.setdefault(lic, {"license": lic, "rows": 0, "sources": [],
                                             "non_commercial": license_is_non_commercial(lic)})
            item["rows"] += entry["rows"]
            if entry["source"] not in item["sources"]:
                item["sources"].append(entry["source"])
    non_commercial = sorted({s["source"] for s in sources if s["non_commercial"]}
                            | set(parent["non_commercial_sources"] if parent else []))
    decontam = sorted(checkpoint_decontaminated_versions(store, checkpoint_id))
    info_rel = f"{store.dataset_dir(name, version)}/_dataset.json"
    inputs = store.read_json(info_rel).get("inputs", {}) if store.exists(info_rel) else {}
    config = manifest.get("config")
    return {
        "checkpoint_id": checkpoint_id,
        "rows": sum(s["rows"] for s in sources),
        "heldout_rows": sum(s["heldout"] for s in sources),
        "left_out_too_long": 0,
        "not_reached": sum(s["not_reached"] for s in sources),
        "sources": sources,
        "licenses": sorted(licenses.values(), key=lambda e: (-e["rows"], e["license"])),
        "non_commercial_sources": non_commercial,
        "commercial_use_ok": not non_commercial,
        "decontamination": decontamination_status(store, decontam[-1]) if decontam else None,
        "registry": {"version": registry_version(), "at_training": manifest.get("registry_version")},
        "mix": {"name": name, "mix_hash": version, "config": None, "config_hash": None, "inputs": inputs,
                "train_row_ids_hash": None, "heldout_row_ids_hash": None},
        "training": {"preset": manifest.get("preset"), "config_hash": _canonical_hash(config) if config else None,
                     "fingerprint": manifest.get("fingerprint"), "base_model_sha256": manifest.get("base_model_sha256"),
                     "seed": manifest.get("seed") or (config or {}).get("seed")},
        "code": {"sft_code_version": manifest.get("sft_code_version"), "format_version": manifest.get("format_version"),
                 "libraries": manifest.get("versions")},
        "parent": parent,
        "checks": {
            "ledger_trained_on_rows": len(trained),
            "ledger_heldout_rows": len(heldout),
            # every row the ledger says was trained on (or measured) is in the dataset the manifest names
            "ledger_matches_mix": (trained | heldout) <= in_dataset,
            "parent_consistent": None if parent is None else all(v is not False for v in parent["checks"].values()),
        },
    }


def bill_markdown(bill: dict[str, Any]) -> str:
    """The bill as markdown (for `tulu audit checkpoint --markdown` and an ``audit_report`` asset)."""
    sources = [{"source": s["source"], "rows": s["rows"], "held out": s["heldout"],
                "license": s["license"] if isinstance(s["license"], str) else ", ".join(s["license"]),
                "non-commercial": "⚠ yes" if s["non_commercial"] else "no",
                "file sha256": (s["ingested_file_sha256"] or ["?"])[0][:12]} for s in bill["sources"]]
    licenses = [{"license": e["license"], "rows": e["rows"], "sources": ", ".join(e["sources"]),
                 "non-commercial": "⚠ yes" if e["non_commercial"] else "no"} for e in bill["licenses"]]
    lines = [f"## Data bill of `{bill['checkpoint_id']}`",
             f"{bill['rows']} training rows from {len(bill['sources'])} sources ({bill['heldout_rows']} held out, "
             f"{bill['left_out_too_long']} left out as too long, {bill.get('not_reached', 0)} in the mix but not "
             "reached within max_steps).",
             "### Sources", markdown_table(sources, ["source", "rows", "held out", "license", "non-commercial",
                                                     "file sha256"], max_chars=60),
             "### Licenses", markdown_table(licenses, ["license", "rows", "sources", "non-commercial"]),
             ("No non-commercial data." if bill["commercial_use_ok"] else
              f"⚠ Non-commercial data from: {', '.join(bill['non_commercial_sources'])}. "
              "This checkpoint may not be used commercially.")]
    d = bill["decontamination"]
    lines.append("### Decontamination")
    if d is None:
        lines.append("⚠ Unknown: the mix records no decontaminated_prompts version.")
    else:
        checks = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in (d["checks"] or {}).items()) or "none recorded"
        lines.append(f"`decontaminated_prompts@{d['version']}`; blocking checks: {checks}.")
        if d.get("benchmarks"):
            lines.append(f"{d['ngram']}-gram overlap at ≥ {d['threshold']:.0%} against "
                         f"{len(d['benchmarks'])} benchmarks "
                         f"({', '.join(sorted(d['benchmarks']))}); {d['rows_removed']} rows removed.")
        else:
            lines.append("⚠ No decontamination report found for this version.")
    m, t, c = bill["mix"], bill["training"], bill["code"]
    hashes = [
        {"what": "mix", "value": f"{m['name']} @ {m['mix_hash']} (config {m['config_hash']})"},
        {"what": "mix inputs", "value": ", ".join(f"{k}@{v}" for k, v in m["inputs"].items())},
        {"what": "train / held-out row ids", "value": f"{m['train_row_ids_hash']} / {m['heldout_row_ids_hash']}"},
        {"what": "training config", "value": f"{t['preset']} (config {t['config_hash']}, seed {t['seed']})"},
        {"what": "run fingerprint", "value": t["fingerprint"]},
        {"what": "base model sha256", "value": t["base_model_sha256"]},
        {"what": "registry version", "value": f"{bill['registry']['version']}"
                                              + (f" (at training: {bill['registry']['at_training']})"
                                                 if bill["registry"]["at_training"] else "")},
        {"what": "code", "value": f"sft {c['sft_code_version']}; "
                                  + ", ".join(f"{k} {v}" for k, v in (c["libraries"] or {}).items())},
    ]
    lines += ["### Versions and hashes", markdown_table(hashes, ["what", "value"], max_chars=120)]
    failed = [k for k, v in bill["checks"].items() if v is False]
    lines += ["### Consistency", ("All checks pass" if not failed else "⚠ Failed: " + ", ".join(failed))
              + f" (the ledger holds {bill['checks']['ledger_trained_on_rows']} trained_on events for it)."]
    if bill.get("parent"):
        lines += [f"### Inherited from `{bill['parent']['checkpoint_id']}` (the checkpoint this one started from)",
                  bill_markdown(bill["parent"]).replace("\n## ", "\n#### ").replace("\n### ", "\n#### ")]
    return "\n\n".join(lines)
