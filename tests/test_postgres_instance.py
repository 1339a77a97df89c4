"""The production Dagster instance configuration (``dagster.postgres.yaml``) against a real Postgres.

Connection settings come from ``TULU_TEST_PG_HOST``, ``TULU_TEST_PG_PORT``, ``TULU_TEST_PG_USER`` and
``TULU_TEST_PG_PASSWORD`` (``.ci/run`` starts Postgres 15 and exports them). Without them, or when the
server does not answer, the Postgres-backed test skips; with ``TULU_REQUIRE_POSTGRES=1`` (as in CI) it
fails instead, so CI can never pass by silently skipping.

Each test run gets its own freshly created database, dropped at teardown.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from resources import DataBundle, TuluStorage
from tulu_pipeline import cli
from tulu_pipeline.data.registry import get_source

# integration: a Postgres server and CLI processes
pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
POSTGRES_TEMPLATE = REPO / "dagster.postgres.yaml"
ENV_VARS = ("TULU_TEST_PG_HOST", "TULU_TEST_PG_PORT", "TULU_TEST_PG_USER", "TULU_TEST_PG_PASSWORD")
PG_DB_ENV = {
    "hostname": "DAGSTER_PG_HOST",
    "port": "DAGSTER_PG_PORT",
    "username": "DAGSTER_PG_USER",
    "password": "DAGSTER_PG_PASSWORD",
    "db_name": "DAGSTER_PG_DB",
}
NON_SECRET_PG_FIELDS = {"scheme"}
# Two real raw-source assets: a mid-size eval file and a gzipped one.
SOURCE_IDS = ("gsm8k_test", "humaneval")


def _require_postgres() -> bool:
    return os.environ.get("TULU_REQUIRE_POSTGRES", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    """Skip, or fail when the environment demands Postgres (CI)."""
    if _require_postgres():
        pytest.fail(f"TULU_REQUIRE_POSTGRES=1 but Postgres is not usable: {reason}", pytrace=False)
    pytest.skip(f"Postgres not available: {reason}")


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=5)


@pytest.fixture(scope="module")
def pg_server() -> PgServer:
    """The Postgres server named by TULU_TEST_PG_*, checked to accept a login."""
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        _unavailable(f"set {', '.join(missing)} (.ci/run exports them after starting Postgres)")
    try:
        import psycopg2
    except ImportError as exc:  # a dev dependency; absent only in a partial install
        _unavailable(f"psycopg2 is not installed ({exc}); pip install -e '.[dev]'")
    try:
        port = int(os.environ["TULU_TEST_PG_PORT"])
    except ValueError:
        _unavailable(f"TULU_TEST_PG_PORT is not a port number: {os.environ['TULU_TEST_PG_PORT']!r}")
    server = PgServer(os.environ["TULU_TEST_PG_HOST"], port,
                      os.environ["TULU_TEST_PG_USER"], os.environ["TULU_TEST_PG_PASSWORD"])
    try:
        server.connect().close()
    except psycopg2.Error as exc:
        _unavailable(f"cannot connect to {server.user}@{server.host}:{server.port}: {str(exc).strip()}")
    return server


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """A fresh, uniquely named database, dropped (with any lingering connections) at teardown."""
    name = f"tulu_test_{uuid.uuid4().hex[:16]}"
    conn = pg_server.connect()
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()


@pytest.fixture
def postgres_instance(pg_server: PgServer, pg_database: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose dagster.yaml is the repo's dagster.postgres.yaml, copied verbatim."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(POSTGRES_TEMPLATE, dagster_home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("DAGSTER_PG_HOST", pg_server.host)
    monkeypatch.setenv("DAGSTER_PG_PORT", str(pg_server.port))
    monkeypatch.setenv("DAGSTER_PG_USER", pg_server.user)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", pg_server.password)
    monkeypatch.setenv("DAGSTER_PG_DB", pg_database)
    monkeypatch.setenv("TULU_HOME", str(tmp_path / "home"))
    try:
        instance = dg.DagsterInstance.get()
    except ModuleNotFoundError as exc:  # a real configuration bug, never a reason to skip
        missing_driver = str(exc)
    else:
        missing_driver = None
    if missing_driver:
        pytest.fail(
            f"dagster.postgres.yaml selects a Postgres driver that is not installed ({missing_driver}). "
            "SQLAlchemy >= 2.1 maps a plain postgresql:// URL to psycopg 3; the project installs psycopg2, "
            "so postgres_db needs `scheme: postgresql+psycopg2`.",
            pytrace=False,
        )
    try:
        yield instance
    finally:
        instance.dispose()  # close the pools before the database is dropped


def _raw_asset(source_id: str) -> dg.AssetsDefinition:
    from definitions import defs

    return defs.get_assets_def(dg.AssetKey(["raw", source_id]))


def test_postgres_instance_records_raw_source_materializations(
    postgres_instance: dg.DagsterInstance, pg_server: PgServer, pg_database: str, tmp_path: Path, bundle: Path,
) -> None:
    instance = postgres_instance
    # The storage really is the Postgres implementation, not a SQLite fallback.
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        assert "Postgres" in type(storage).__name__, type(storage)
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    concurrency = instance.get_concurrency_config()  # GPU runs one at a time, GPU steps one per pool slot
    assert concurrency.run_queue_config.tag_concurrency_limits == [{"key": "tulu/compute", "value": "gpu", "limit": 1}]
    assert concurrency.pool_config.default_pool_limit == 1

    keys = [dg.AssetKey(["raw", source_id]) for source_id in SOURCE_IDS]
    result = dg.materialize(
        [_raw_asset(source_id) for source_id in SOURCE_IDS],
        instance=instance,
        resources={"storage": TuluStorage(root=str(tmp_path / "home")), "data_bundle": DataBundle(data_dir=str(bundle))},
    )
    assert result.success
    run_id = result.run_id

    # Read back through the instance: the run, each materialization and its row count.
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert get_source("gsm8k_test").rows == 1319
    for source_id, key in zip(SOURCE_IDS, keys):
        event = instance.get_latest_materialization_event(key)
        assert event is not None, key
        assert event.run_id == run_id
        materialization = event.asset_materialization
        assert materialization is not None
        assert materialization.metadata["dagster/row_count"].value == get_source(source_id).rows
        assert materialization.metadata["quarantined"].value == 0

    # Both blocking checks of each asset were evaluated, passed, and recorded in Postgres.
    for key in keys:
        for check_name in ("row_count_matches_manifest", "unique_row_ids"):
            check_key = dg.AssetCheckKey(key, check_name)
            history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=1)
            assert history, check_key
            record = history[0]
            assert record.run_id == run_id
            assert record.status.value == "SUCCEEDED", (check_key, record.status)
            assert record.event is not None and record.event.dagster_event is not None
            evaluation = record.event.dagster_event.event_specific_data
            assert evaluation.passed is True, check_key

    # Prove it is the Postgres database itself that holds the run, not some other storage.
    conn = pg_server.connect(pg_database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
            assert cur.fetchall() == [("SUCCESS",)]
            cur.execute("SELECT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                        (run_id, "ASSET_MATERIALIZATION"))
            stored_keys = sorted(row[0] for row in cur.fetchall())
            assert stored_keys == sorted(key.to_string() for key in keys)
            cur.execute("SELECT count(*) FROM asset_check_executions WHERE run_id = %s AND execution_status = %s",
                        (run_id, "SUCCEEDED"))
            assert cur.fetchone()[0] == 2 * len(keys)
    finally:
        conn.close()


def test_tulu_instance_cli_writes_postgres_config_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    dagster_home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.delenv("TULU_DAGSTER_STORAGE", raising=False)

    assert cli.main(["instance", "--storage", "postgres"]) == 0
    assert "postgres storage" in capsys.readouterr().out
    written = dagster_home / "dagster.yaml"
    assert written.read_bytes() == POSTGRES_TEMPLATE.read_bytes()
    assert not (dagster_home / "dagster.yaml.tmp").exists()

    config = yaml.safe_load(written.read_text())
    postgres = config["storage"]["postgres"]
    assert "postgres_url" not in postgres  # a URL would carry the password inline
    postgres_db = postgres["postgres_db"]
    # Every connection setting (credentials included) comes from the environment; the only literal
    # allowed is the non-secret SQLAlchemy driver scheme.
    for field, var in PG_DB_ENV.items():
        assert postgres_db.get(field) == {"env": var}, f"postgres_db.{field} must be `env: {var}`, got {postgres_db.get(field)!r}"
    assert set(postgres_db) <= set(PG_DB_ENV) | NON_SECRET_PG_FIELDS, sorted(set(postgres_db) - set(PG_DB_ENV))

    # The file validates against Dagster's instance schema once the environment supplies the values.
    from dagster._core.instance.config import dagster_instance_config

    for var in PG_DB_ENV.values():
        monkeypatch.setenv(var, "5432" if var == "DAGSTER_PG_PORT" else "x")
    validated, _ = dagster_instance_config(str(dagster_home))
    assert "postgres" in validated["storage"]


def test_two_runs_materializing_one_asset_at_once_stay_consistent(
    postgres_instance: dg.DagsterInstance, tmp_path: Path,
) -> None:
    """Two Dagster runs (two CLI processes, one Postgres-backed instance, one TULU_HOME) materialize the same
    raw asset at the same time: both succeed, the dataset is whole and the ledger holds each row once."""
    import subprocess
    import sys

    from tulu_pipeline.provenance.ledger import Ledger
    from tulu_pipeline.storage import Store

    command = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "definitions",
               "--select", "raw/vicuna_bench"]
    procs = [subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    runs = postgres_instance.get_runs()
    assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    store = Store(str(tmp_path / "home"))
    rows = list(store.iter_rows("raw/vicuna_bench"))
    assert len(rows) == get_source("vicuna_bench").rows == len({r["row_id"] for r in rows})
    ingested = Ledger(store).query("SELECT row_id, count(*) AS n FROM events WHERE event = 'ingested' GROUP BY row_id")
    assert len(ingested) == len(rows) and all(r["n"] == 1 for r in ingested)
    assert not list(Path(store.root).rglob("*.tmp-*"))
