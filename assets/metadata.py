"""Metadata helpers shared by every asset: schemas, sample tables, images."""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa

from tulu_pipeline.evaluation.paired import format_p
from tulu_pipeline.hashing import json_hash
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.plots import markdown_table
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.storage import Store


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


def image(store: Store, rel_path: str, png: bytes) -> dg.MetadataValue:
    """Save a PNG under TULU_HOME and return it as markdown the Dagster UI renders inline."""
    store.write_bytes(rel_path, png)
    encoded = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"![{posixpath.basename(rel_path)}](data:image/png;base64,{encoded})")


def samples(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(rows, columns))


# The training stages' checkpoint assets, in recipe order.
TRAINED_CHECKPOINT_ASSETS = ["sft_checkpoint", "dpo_checkpoint", "rlvr_checkpoint"]


def latest_checkpoint_id(instance: dg.DagsterInstance, key: str | dg.AssetKey) -> str | None:
    """The ``checkpoint_id`` that asset ``key``'s latest materialization reported, or None."""
    event = instance.get_latest_materialization_event(dg.AssetKey.from_coercible(key))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("checkpoint_id")
    return None if value is None else getattr(value, "value", value)


def checkpoint_metadata(store: Store, checkpoint_id: str, checkpoint_dir: str, reported: Mapping[str, Any],
                        plots: Mapping[str, tuple[str, str]] = {}, **extra: Any) -> tuple[dict[str, Any], dict]:
    """What every checkpoint asset shows, and the training manifest it was read from.

    The training job's reported values, then the checkpoint id, config (and its hash), path, template lineage
    and scalar metrics from the manifest, then ``extra``, then each plot the job wrote (name -> (its file in
    the checkpoint, where the image is kept))."""
    manifest = store.read_json(posixpath.join(checkpoint_dir, MANIFEST_FILE))
    metrics = manifest.get("metrics") or {}
    metadata: dict[str, Any] = {
        **reported,
        "checkpoint_id": checkpoint_id,
        "config_hash": config_hash(manifest["config"]),
        "path": dg.MetadataValue.path(store.uri(checkpoint_dir)),
        "config": dg.MetadataValue.json(manifest["config"]),
        "template_lineage": dg.MetadataValue.json(lineage_hashes(manifest.get("template_lineage"))),
        "metrics": dg.MetadataValue.json({k: v for k, v in metrics.items() if not isinstance(v, list)}),
        **extra,
    }
    for name, (written, kept) in plots.items():
        if store.exists(written):
            metadata[name] = image(store, kept, store.read_bytes(written))
    return metadata, manifest


def heldout_effect_metadata(effect: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """A training run's paired held-out effect (``{metric: paired_delta}``, Δ = after − before on the same
    held-out items) as json and as a table: metric, Δ, 95% CI, sign-test p, n (changed). Nothing for a
    checkpoint published before the effect was measured."""
    if not effect:
        return {}
    rows = [{"metric": metric, "Δ": _signed(d.get("delta")),
             "95% CI": f"[{_signed(d.get('ci_low'))}, {_signed(d.get('ci_high'))}]",
             "sign-test p": "–" if d.get("p_value") is None else format_p(d["p_value"]),
             "n (changed)": f"{d.get('n')} ({d.get('changed')})"} for metric, d in effect.items()]
    table = markdown_table(rows, ["metric", "Δ", "95% CI", "sign-test p", "n (changed)"])
    return {"heldout_effect": dg.MetadataValue.json(dict(effect)),
            "heldout_effect_table": dg.MetadataValue.md(
                f"{table}\n\nΔ = after − before, paired on the same held-out items (seeded bootstrap interval; "
                "sign test over the items that changed).")}


def _signed(value: float | None) -> str:
    # 3 significant digits: accuracies, losses and DPO margins differ by orders of magnitude
    return "–" if value is None else f"{value:+.3g}"


def config_hash(config: Any) -> str:
    """A short, stable hash of an asset's configuration (pydantic model or plain data)."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return json_hash(data, default=str)


# Who answers for each stage in the UI's asset catalog.
DATA_OWNERS = ["team:data-curation"]
TRAINING_OWNERS = ["team:post-training"]
