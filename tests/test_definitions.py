"""The code location: it loads, its graph matches the checked-in snapshot, and assets materialize."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets.sources import raw_source_assets
from definitions import defs
from resources import DataBundle, TuluStorage, resources_for
from tulu_pipeline.cli import main as tulu
from tulu_pipeline.data.registry import registry
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import Store

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def asset_graph_snapshot() -> dict:
    """Every asset key with its group, kinds, code version, dependencies and checks."""
    graph = defs.resolve_asset_graph()
    checks: dict[str, list] = {}
    for assets_def in graph.assets_defs:
        for spec in assets_def.check_specs:
            checks.setdefault(spec.asset_key.to_user_string(), []).append(
                {"name": spec.name, "blocking": spec.blocking})
    assets = {}
    for spec in defs.resolve_all_asset_specs():
        key = spec.key.to_user_string()
        assets[key] = {
            "group": spec.group_name,
            "kinds": sorted(spec.kinds),
            "code_version": spec.code_version,
            "deps": sorted(d.asset_key.to_user_string() for d in spec.deps),
            "checks": sorted(checks.get(key, []), key=lambda c: c["name"]),
        }
    jobs = sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__"))
    return {"assets": dict(sorted(assets.items())), "jobs": jobs}


def test_asset_graph_matches_snapshot() -> None:
    current = asset_graph_snapshot()
    if os.environ.get("TULU_UPDATE_SNAPSHOTS") == "1":
        # Update mode writes and stops: a test that compared against what it just wrote would pass by construction.
        staged = SNAPSHOT.with_name(f".{SNAPSHOT.name}.tmp")
        staged.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        staged.replace(SNAPSHOT)
        pytest.exit(f"TULU_UPDATE_SNAPSHOTS=1: wrote {SNAPSHOT}; review and commit it, then rerun without the "
                    "variable to check it (nothing was tested)", returncode=pytest.ExitCode.TESTS_FAILED)
    expected = json.loads(SNAPSHOT.read_text())
    assert current == expected, (
        "the asset graph changed; if intended, rerun with TULU_UPDATE_SNAPSHOTS=1 (it writes the snapshot and stops), review and commit it"
    )


def test_one_raw_asset_per_registry_row() -> None:
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {f"raw/{s.id}" for s in registry()} <= keys
    assert "base_model" in keys


@pytest.mark.integration
def test_definitions_validate_cli(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_unknown_deployment_is_rejected() -> None:
    with pytest.raises(ValueError, match="TULU_DEPLOYMENT must be one of"):
        resources_for("laptop")


def _materialize(tmp_path: Path, keys: list[list[str]], bundle: Path) -> tuple[dg.ExecuteInJobResult, Store]:
    home = tmp_path / "home"
    wanted = {dg.AssetKey(k) for k in keys}
    selected = [a for a in raw_source_assets if a.key in wanted]
    result = dg.materialize(
        selected,
        resources={"storage": TuluStorage(root=str(home)), "data_bundle": DataBundle(data_dir=str(bundle))},
    )
    return result, Store(str(home))


@pytest.mark.integration
def test_raw_sources_materialize_with_metadata_and_trace(tmp_path: Path, bundle: Path, capsys) -> None:
    result, store = _materialize(tmp_path, [["raw", "gsm8k_train"], ["raw", "alpaca_eval"]], bundle)
    assert result.success
    materialization = result.asset_materializations_for_node("raw__gsm8k_train")[0]
    metadata = materialization.metadata
    assert metadata["dagster/row_count"].value == 7473
    assert metadata["license"].value == "MIT"
    assert metadata["non_commercial"].value is False
    assert "Natalia sold clips" in metadata["samples"].value
    assert metadata["length_histogram"].value.startswith("![lengths.png](data:image/png;base64,")
    assert {c.name for c in metadata["dagster/column_schema"].schema.columns} >= {"row_id", "messages", "license"}
    version = metadata["version"].value
    assert materialization.tags["dagster/data_version"] == version
    assert (Path(store.root) / "reports" / "raw" / "gsm8k_train" / version / "lengths.png").exists()

    alpaca = result.asset_materializations_for_node("raw__alpaca_eval")[0].metadata
    assert alpaca["non_commercial"].value is True

    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(c.passed for c in checks)

    rows = [r for batch in store.iter_dataset("raw/gsm8k_train") for r in batch]
    assert len(rows) == 7473 and rows[0]["license"] == "MIT"
    assert Ledger(store).query("SELECT count(*) AS n FROM events WHERE event = 'ingested'") == [{"n": 7473 + 805}]

    capsys.readouterr()
    assert tulu(["--home", str(store.root), "trace", rows[16]["row_id"]]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert traced["origin"]["file"] == "train/gsm8k/train.jsonl" and traced["origin"]["line"] == 17
    assert traced["events"][0]["run_id"] == result.run_id


@pytest.mark.integration
def test_rematerializing_gives_identical_rows(tmp_path: Path, bundle: Path) -> None:
    _, first = _materialize(tmp_path / "a", [["raw", "mbpp"]], bundle)
    _, second = _materialize(tmp_path / "b", [["raw", "mbpp"]], bundle)
    assert first.latest_version("raw/mbpp") == second.latest_version("raw/mbpp")
    rows_a = [r for b in first.iter_dataset("raw/mbpp") for r in b]
    rows_b = [r for b in second.iter_dataset("raw/mbpp") for r in b]
    assert rows_a == rows_b


@pytest.mark.integration
def test_bad_source_fails_the_asset_with_file_and_line(tmp_path: Path, bundle: Path) -> None:
    bad_bundle = tmp_path / "bundle"
    spec = next(s for s in registry() if s.id == "koala")
    (bad_bundle / spec.path).parent.mkdir(parents=True)
    (bad_bundle / spec.path).write_bytes((bundle / spec.path).read_bytes()[:-40])
    with pytest.raises(Exception, match=r"sha256 mismatch for source 'koala'"):
        _materialize(tmp_path, [["raw", "koala"]], bad_bundle)
