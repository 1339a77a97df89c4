"""One harness for every job the compute launcher runs in its own process (``python -m <module>``).

A job is a function ``run(params, reporter) -> JobOutcome``. `job_main` gives it the same two ways in:

- under Dagster (dagster-pipes: PipesSubprocessClient locally, the Kubernetes launcher in a pod) the
  parameters are the Pipes context's extras, progress streams through a `PipesReporter`, and the outcome is
  reported as the step's materialization. Under ``torchrun`` every rank runs the job but only rank 0 opens
  the Pipes session (one report per step); the other ranks read the extras without opening one;
- without Dagster, ``--params params.json`` (the same fields) runs it with a `PrintReporter` and prints one
  JSON line ``{"event": "<name>_result", ...}`` with the outcome's plain values.

The helpers below build dagster-pipes metadata: plain values are inferred by Dagster, typed ones are
``{"raw_value", "type"}``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu_pipeline.progress import METRICS_EVENT, NullReporter, PipesReporter, PrintReporter, Reporter
from tulu_pipeline.storage import Store


@dataclass
class JobOutcome:
    """What a job hands back: its materialization metadata and data version (and, for a job that reports
    another asset than the step's own, that asset's key). ``summary`` is what ``--params`` prints (default:
    the plain values of ``metadata`` but the keys the `Job` hides)."""

    metadata: dict[str, Any]
    data_version: str | None = None
    asset_key: str | None = None
    summary: dict[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    """A Pipes entrypoint: its module, its function, and the names of its progress and result lines."""

    module: str
    run: Callable[[dict[str, Any], Reporter], JobOutcome]
    result_event: str
    metrics_event: str = METRICS_EVENT
    hidden: tuple[str, ...] = field(default=())  # metadata left out of the printed summary (images, long lists)
    # what ranks other than 0 run under torchrun (they publish and report nothing); default: ``run``
    worker: Callable[[dict[str, Any], Reporter], Any] | None = None


def job_main(job: Job, argv: list[str] | None = None, description: str | None = None) -> int:
    """Run ``job`` from the command line or under Dagster (module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog=f"python -m {job.module}", description=description)
    parser.add_argument("--params", type=Path, help="JSON file with the job parameters (runs without Dagster)")
    args = parser.parse_args(argv)

    worker = int(os.environ.get("RANK", "0")) != 0  # a torchrun rank other than 0: trains, reports nothing
    if args.params is not None:
        params = json.loads(args.params.read_text(encoding="utf-8"))
        if worker:
            (job.worker or job.run)(params, NullReporter(job.metrics_event))
            return 0
        outcome = job.run(params, PrintReporter(event=job.metrics_event))
        summary = outcome.summary if outcome.summary is not None else {
            k: v for k, v in plain(outcome.metadata).items() if k not in job.hidden}
        print(json.dumps({"event": job.result_event, **summary}, sort_keys=True, default=str), flush=True)
        return 0

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        parser.error("not launched by Dagster (no pipes context): pass --params params.json")
    if worker:  # one Pipes session (rank 0's) per step
        (job.worker or job.run)(pipes_extras(), NullReporter(job.metrics_event))
        return 0
    with open_dagster_pipes() as context:
        outcome = job.run(dict(context.extras), PipesReporter(context, event=job.metrics_event))
        context.report_asset_materialization(metadata=outcome.metadata, data_version=outcome.data_version,
                                             asset_key=outcome.asset_key)
    return 0


def pipes_extras() -> dict[str, Any]:
    """The step's extras, read from the Pipes context without opening a session (no messages are sent)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    with PipesDefaultContextLoader().load_context(PipesEnvVarParamsLoader().load_context_params()) as data:
        return dict(data.get("extras") or {})


def require(params: Mapping[str, Any], keys: Iterable[str], job: str) -> None:
    """Raise naming the job and every required parameter that is missing or empty."""
    missing = [key for key in keys if not params.get(key)]
    if missing:
        raise ValueError(f"{job} parameters lack {missing}")


def rows_split_by_id(store: Store, name: str, version: str | None, heldout_ids: Iterable[str],
                     reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """Rows of ``name@version`` (latest when None) split into (others, held-out) by ``heldout_ids``; held-out ids
    not found are reported."""
    wanted = set(heldout_ids)
    train: list[dict] = []
    heldout: list[dict] = []
    for row in store.iter_rows(name, version):
        (heldout if row["row_id"] in wanted else train).append(row)
    if len(wanted) > len(heldout):
        reporter.log(f"{len(wanted) - len(heldout)} held-out row ids are not in {name}; "
                     f"measuring on the {len(heldout)} found")
    return train, heldout


# ---------------------------------------------------------------------------------------------
# typed metadata
# ---------------------------------------------------------------------------------------------
def typed(value: Any, kind: str) -> dict[str, Any]:
    """A dagster-pipes metadata value of an explicit type (``path``, ``json``, ``md``, ``float`` ...)."""
    return {"raw_value": value, "type": kind}


def png_markdown(png: bytes, alt: str) -> dict[str, Any]:
    """An inline PNG as markdown metadata (rendered by the Dagster UI)."""
    return typed(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})", "md")


def floats(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``keys`` of ``values`` as float metadata; missing or None values are left out."""
    return {key: typed(float(values[key]), "float") for key in keys if values.get(key) is not None}


def ints(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, int]:
    """``keys`` of ``values`` as integers (0 where missing)."""
    return {key: int(values.get(key) or 0) for key in keys}


def plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with typed values unwrapped (for printing)."""
    return {k: (v["raw_value"] if isinstance(v, dict) and "raw_value" in v else v) for k, v in metadata.items()}
