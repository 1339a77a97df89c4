"""Keeping data fresh: observed source files, the re-curation sensor and schedule, stage jobs, freshness checks,
GPU pools and retry policies, and the check that flags checkpoints trained before a benchmark existed.

Curation reruns by itself when a source changes or on its weekly schedule; training never starts by itself
unless ``TULU_AUTO_TRAIN=1`` (and even then the blocking checks of the curated data stop it).
"""

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterable, Sequence

import dagster as dg

from assets.metadata import DATA_OWNERS, latest_checkpoint_id
from resources import DataBundle, TuluStorage
from tulu_pipeline.data.registry import SourceSpec, registry
from tulu_pipeline.data.versions import changed_sources, dump_versions, load_versions, look_at_sources
from tulu_pipeline.hashing import short_hash
from tulu_pipeline.data.coverage import eval_coverage
from tulu_pipeline.settings import data_dir

GPU_POOL = "gpu"
GPU_TAGS = {"tulu/compute": "gpu"}
CURATION_GROUPS = ("sources", "curation")
RECURATE_CRON = os.environ.get("TULU_RECURATE_CRON", "0 3 * * 1")  # Mondays 03:00 UTC
SOURCE_MAX_AGE_DAYS = float(os.environ.get("TULU_SOURCE_MAX_AGE_DAYS", "30"))
SENSOR_INTERVAL_S = int(os.environ.get("TULU_SOURCE_SENSOR_INTERVAL_S", "60"))
COVERAGE_CHECK = "decontaminated_against_current_evals"

# Transient failures (a pod evicted, an HTTP judge timing out, a flaky object store) are retried with
# exponential backoff; bad data is raised as dg.Failure(allow_retries=False) by `final_on_bad_data`.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=20, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
# What every GPU-stage asset declares: the launcher's GPU tag, the GPU concurrency pool and the retry policy for
# transient failures (`@dg.asset(..., **GPU_STAGE)`).
GPU_STAGE = {"tags": GPU_TAGS, "pool": GPU_POOL, "retry_policy": TRANSIENT_RETRY}


def auto_train_enabled() -> bool:
    """Training assets get an automation condition only when ``TULU_AUTO_TRAIN`` is 1/true/yes."""
    return os.environ.get("TULU_AUTO_TRAIN", "0").strip().lower() in ("1", "true", "yes", "on")


def source_file_key(source_id: str) -> dg.AssetKey:
    return dg.AssetKey(["source_file", source_id])


def _observation(spec: SourceSpec, version) -> dict:
    return {"path": spec.path, "size_bytes": version.size, "pinned_sha256": spec.sha256,
            "matches_manifest": version.matches_manifest, "missing": version.sha256 is None}


def build_source_files(specs: Sequence[SourceSpec]) -> dg.AssetsDefinition:
    """One observable asset per staged file; its data version is the file's sha256."""

    @dg.multi_observable_source_asset(
        name="source_files",
        specs=[dg.AssetSpec(source_file_key(s.id), group_name="sources", owners=DATA_OWNERS, kinds={"file"},
                            description=f"{s.path} as staged in the data bundle; observed by content hash.",
                            metadata={"path": s.path, "license": s.license})
               for s in specs],
        can_subset=True,
    )
    def source_files(context: dg.AssetExecutionContext, data_bundle: DataBundle):
        versions = look_at_sources(specs, data_bundle.path())
        for spec in specs:
            key = source_file_key(spec.id)
            if key not in context.selected_asset_keys:
                continue
            version = versions[spec.id]
            yield dg.ObserveResult(asset_key=key, metadata=_observation(spec, version),
                                   data_version=dg.DataVersion(version.sha256 or "missing"))

    return source_files


def build_source_change_sensor(job, specs_fn: Callable[[], Sequence[SourceSpec]] = registry,
                               root_fn=data_dir, checkpoint_keys: Iterable[dg.AssetKey] = ()) -> dg.SensorDefinition:
    """Re-curates what depends on a changed source file, and nothing else.

    The cursor holds every file's (size, mtime, sha256). A changed training pool reruns its raw table and the
    curation chain below it; a changed or new benchmark reruns its raw table and decontamination. The run config
    is the default, so decontamination is incremental (`curation.incremental`): the pool is scanned against the
    changed benchmark only, and when a pool gains rows only the new rows are scanned (and re-checked). It then
    re-evaluates the coverage check of every checkpoint, which flags checkpoints trained on data never
    decontaminated against it. A file that no longer matches its MANIFEST.json hash is
    reported, not ingested: the run would fail on the hash check, so the sensor asks for the manifest update first.
    """
    checkpoint_keys = list(checkpoint_keys)

    @dg.sensor(name="source_change_sensor", job=job, minimum_interval_seconds=SENSOR_INTERVAL_S,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Observes every source file's content hash; re-curates what depends on a changed one.")
    def source_change_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        specs = list(specs_fn())
        by_id = {s.id: s for s in specs}
        before = load_versions(context.cursor)
        after = look_at_sources(specs, root_fn(), before)
        cursor = dump_versions(after)
        changed = [i for i in changed_sources(before, after) if i in by_id]
        observations = [dg.AssetObservation(source_file_key(i), metadata=_observation(by_id[i], after[i]),
                                            tags={"dagster/data_version": after[i].sha256 or "missing"})
                        for i in sorted(after) if i not in before or i in changed]
        if not before:
            return dg.SensorResult(skip_reason="first look: recorded every source file's hash", cursor=cursor,
                                   asset_events=observations)
        unpinned = [i for i in changed if not after[i].matches_manifest]
        usable = [i for i in changed if after[i].matches_manifest]
        for source_id in unpinned:
            context.log.warning(f"{by_id[source_id].path} changed but its sha256 {after[source_id].sha256} is not "
                                f"the one in MANIFEST.json; update the manifest entry to re-curate it")
        if not usable:
            reason = "no source changed" if not changed else f"changed but not re-pinned in MANIFEST.json: {unpinned}"
            return dg.SensorResult(skip_reason=reason, cursor=cursor, asset_events=observations)

        graph = context.repository_def.asset_graph
        raw = dg.AssetSelection.assets(*[dg.AssetKey(["raw", i]) for i in usable])
        selection = (raw | raw.downstream()) & dg.AssetSelection.groups(*CURATION_GROUPS)
        keys = sorted(selection.resolve(graph), key=lambda k: k.to_user_string())
        check_keys = []
        if any(by_id[i].role == "eval" for i in usable):
            check_keys = [dg.AssetCheckKey(k, COVERAGE_CHECK) for k in checkpoint_keys
                          if context.instance.get_latest_materialization_event(k) is not None]
        run = dg.RunRequest(run_key=f"sources-{cursor_digest(cursor)}", asset_selection=keys,
                            asset_check_keys=check_keys or None,
                            tags={"tulu/trigger": "source_change", "tulu/changed_sources": ",".join(usable)[:200],
                                  "tulu/decontamination": "incremental"})
        return dg.SensorResult(run_requests=[run], cursor=cursor, asset_events=observations)

    return source_change_sensor


def cursor_digest(cursor: str) -> str:
    return short_hash(cursor)


def _coverage_check(key: dg.AssetKey) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=key, name=COVERAGE_CHECK, blocking=False,
                    description="every current eval benchmark was in the decontamination of the data this "
                    "checkpoint (and the checkpoints it started from) was trained on")
    def coverage_check(context: dg.AssetCheckExecutionContext, storage: TuluStorage) -> dg.AssetCheckResult:
        checkpoint_id = latest_checkpoint_id(context.instance, key)
        if checkpoint_id is None:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                       metadata={"reason": "no materialization with a checkpoint_id yet"})
        coverage = eval_coverage(storage.store(), checkpoint_id)
        missing = coverage.missing_benchmarks([s for s in registry() if s.role == "eval"])
        return dg.AssetCheckResult(
            passed=coverage.complete, severity=dg.AssetCheckSeverity.WARN,
            description=None if coverage.complete else
            f"{checkpoint_id} was trained on data not decontaminated against: {', '.join(missing)}; "
            "its scores on these benchmarks may be contaminated",
            metadata={"checkpoint_id": checkpoint_id, "possibly_contaminated_benchmarks": missing,
                      "missing_sources": coverage.missing, "stale_sources": coverage.stale,
                      "decontaminated_versions": coverage.decontaminated_versions},
        )

    return coverage_check


def build_coverage_checks(checkpoint_keys: Iterable[dg.AssetKey]) -> list[dg.AssetChecksDefinition]:
    """Per checkpoint asset: was its training data (and its ancestors') decontaminated against every current
    benchmark? A benchmark added or changed after training makes this fail (WARN) and names it."""
    return [_coverage_check(key) for key in checkpoint_keys]


def stage_jobs(groups: Sequence[str]) -> dict:
    """A job per stage group (sources, curation, sft, ...); GPU stages carry the GPU run tag and retries."""
    jobs = {}
    for group in groups:
        gpu = group not in CURATION_GROUPS and group != "audit"
        jobs[group] = dg.define_asset_job(
            f"{group}_job", selection=dg.AssetSelection.groups(group),
            description=f"Materialize the {group} stage.", tags=GPU_TAGS if gpu else {},
            op_retry_policy=TRANSIENT_RETRY,
        )
    return jobs


def source_freshness_policy() -> dg.FreshnessPolicy:
    """Raw tables warn at 80% of TULU_SOURCE_MAX_AGE_DAYS since their last ingest and fail past it."""
    limit = timedelta(days=SOURCE_MAX_AGE_DAYS)
    return dg.FreshnessPolicy.time_window(fail_window=limit, warn_window=limit * 0.8)


def build_recuration():
    """The re-curation job (raw tables + curation) and its schedule (weekly by default)."""
    job = dg.define_asset_job(
        "recuration_job", selection=dg.AssetSelection.groups(*CURATION_GROUPS) - dg.AssetSelection.key_prefixes("source_file"),
        description="Re-ingest every source and re-run normalization, dedup and decontamination.",
        op_retry_policy=TRANSIENT_RETRY, tags={"tulu/trigger": "recuration"},
    )
    schedule = dg.ScheduleDefinition(
        name="weekly_recuration", job=job, cron_schedule=RECURATE_CRON, execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-curate on a schedule (TULU_RECURATE_CRON, now {RECURATE_CRON!r}).",
    )
    return job, schedule


@contextmanager
def final_on_bad_data(errors: tuple[type[BaseException], ...] = (ValueError, LookupError)):
    """Turns bad-data errors into ``dg.Failure(allow_retries=False)``: a retry cannot fix bad input, while
    everything else (OSError, timeouts, a lost pod) stays retryable under TRANSIENT_RETRY."""
    try:
        yield
    except dg.Failure:
        raise
    except errors as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
