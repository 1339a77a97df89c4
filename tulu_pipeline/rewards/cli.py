"""`tulu verify`: score a JSONL file of responses, one JSON verdict line per input line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tulu_pipeline.rewards import TASKS, verify

_CONSTRAINT_KEYS = ("instruction_id_list", "kwargs")


def _fail(path: Path, line_no: int, message: str) -> ValueError:
    return ValueError(f"{path}:{line_no}: {message}")


def read_requests(path: Path, task: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Validated (line number, {"id", "response", "ground_truth" | "constraints"}) from a JSONL file.

    Blank lines are skipped. Raises ValueError naming the file and line for invalid JSON, a missing
    field or a wrong type; FileNotFoundError when the file is missing.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise _fail(path, line_no, f"expected a JSON object, got {type(record).__name__}")
            if "id" not in record:
                raise _fail(path, line_no, "missing field 'id'")
            if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
                raise _fail(path, line_no, f"'id' must be a string or an integer, got {record['id']!r}")
            if not isinstance(record.get("response"), str):
                raise _fail(path, line_no, "missing field 'response'" if "response" not in record
                            else f"'response' must be a string, got {type(record['response']).__name__}")
            request: dict[str, Any] = {"id": record["id"], "response": record["response"]}
            if task == "ifeval":
                constraints = record.get("constraints")
                if constraints is None:
                    if "instruction_id_list" not in record:
                        raise _fail(path, line_no, "missing field 'constraints' (or top-level 'instruction_id_list'"
                                    " and 'kwargs')")
                    constraints = {key: record.get(key) for key in _CONSTRAINT_KEYS}
                if not isinstance(constraints, dict):
                    raise _fail(path, line_no, f"'constraints' must be an object, got {type(constraints).__name__}")
                request["constraints"] = constraints
            else:
                if "ground_truth" not in record:
                    raise _fail(path, line_no, "missing field 'ground_truth'")
                truth = record["ground_truth"]
                if isinstance(truth, (int, float)) and not isinstance(truth, bool):
                    truth = str(truth)
                if not isinstance(truth, str) or not truth.strip():
                    raise _fail(path, line_no, f"'ground_truth' must be a non-empty string, got {truth!r}")
                request["ground_truth"] = truth
            yield line_no, request


def run_verify(task: str, path: Path, mode: str = "strict", out: TextIO | None = None) -> int:
    """Verify every line of `path`; print {"id", "score", "ok", "reason"} per line. Returns the exit code.

    The whole file is validated before anything is printed, so a bad line never leaves partial output.
    """
    out = out or sys.stdout
    requests = list(read_requests(Path(path), task))
    verdicts = []
    for line_no, request in requests:
        try:
            verdict = verify(task, request["response"], ground_truth=request.get("ground_truth"),
                             constraints=request.get("constraints"), mode=mode)
        except ValueError as exc:
            raise _fail(Path(path), line_no, str(exc)) from None
        verdicts.append({"id": request["id"], "score": verdict.score, "ok": verdict.ok, "reason": verdict.reason})
    for verdict in verdicts:
        out.write(json.dumps(verdict, ensure_ascii=False) + "\n")
    return 0
