"""Read a registered source file record by record and map each record onto the row schema.

Records stream with their exact location (file and line) and raw bytes, which give the row id.
A record that cannot be read or mapped raises `SourceRecordError` naming file, line and what was
expected, or, when the caller passes ``on_bad``, is handed to it (a quarantine) and skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu_pipeline.data.registry import GroundTruthSpec, MappingSpec, SourceSpec, verify_file
from tulu_pipeline.data.schema import make_row_id, row_problems


class SourceRecordError(ValueError):
    """A record that does not match what the registry expects."""

    def __init__(self, file: str, line: int, message: str, raw: bytes = b""):
        self.file, self.line, self.reason, self.raw = file, line, message, raw
        super().__init__(f"{file}:{line}: {message}")


@dataclass(frozen=True)
class RawRecord:
    """One record as found in the file: where it starts, its exact bytes, and the parsed value."""

    line: int
    index: int
    raw: bytes
    value: Any


@dataclass(frozen=True)
class BadRecord:
    """A record rejected during loading, kept for the quarantine."""

    source: str
    source_key: str
    line: int
    reason: str
    raw: bytes


# ---------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------
def _decode(raw: bytes, file: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceRecordError(file, line, f"invalid UTF-8 at byte {exc.start} (expected UTF-8 text)") from exc


def iter_jsonl_records(handle: io.BufferedReader, file: str) -> Iterator[RawRecord | SourceRecordError]:
    """JSON lines of an open binary file with their line numbers; bad lines come back as errors."""
    index = 0
    for line_no, raw_line in enumerate(handle, start=1):
        raw = raw_line.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            value = json.loads(_decode(raw, file, line_no))
        except SourceRecordError as exc:
            exc.raw = raw
            yield exc
            index += 1
            continue
        except json.JSONDecodeError as exc:
            yield SourceRecordError(file, line_no, f"invalid JSON ({exc.msg} at column {exc.colno}); "
                                    "expected one JSON object per line", raw)
            index += 1
            continue
        yield RawRecord(line_no, index, raw, value)
        index += 1


_WS = re.compile(r"\s*")


def _iter_json_array(path: Path, file: str, records_key: str | None) -> Iterator[RawRecord | SourceRecordError]:
    """Elements of a JSON array (top-level, or under ``records_key``) with their starting line."""
    text = _decode(path.read_bytes(), file, 1)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceRecordError(file, exc.lineno, f"invalid JSON ({exc.msg}); expected a JSON document") from exc
    if records_key is not None:
        if not isinstance(document, dict) or not isinstance(document.get(records_key), list):
            raise SourceRecordError(file, 1, f"expected an object with a list under {records_key!r}")
        match = re.search(r'"%s"\s*:\s*\[' % re.escape(records_key), text)
        assert match is not None  # json parsed it, so the key is there
        pos = match.end()
    else:
        if not isinstance(document, list):
            raise SourceRecordError(file, 1, f"expected a JSON array of records, got {type(document).__name__}")
        pos = _WS.match(text, 0).end() + 1
    decoder = json.JSONDecoder()
    line, scanned, index = 1, 0, 0
    while True:
        pos = _WS.match(text, pos).end()
        if text[pos] == "]":
            return
        value, end = decoder.raw_decode(text, pos)
        line += text.count("\n", scanned, pos)
        scanned = pos
        yield RawRecord(line, index, text[pos:end].encode("utf-8"), value)
        index += 1
        pos = _WS.match(text, end).end()
        if text[pos] == ",":
            pos += 1


def _iter_csv(handle: io.TextIOBase, file: str) -> Iterator[RawRecord | SourceRecordError]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise SourceRecordError(file, 1, "empty CSV file; expected a header row") from None
    index = 0
    while True:
        start_line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield SourceRecordError(file, start_line, f"malformed CSV ({exc})")
            return
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield SourceRecordError(file, start_line, f"expected {len(header)} columns {header}, got {len(values)}")
            index += 1
            continue
        raw = json.dumps(values, ensure_ascii=False).encode("utf-8")
        yield RawRecord(start_line, index, raw, dict(zip(header, values)))
        index += 1


def iter_raw_records(spec: SourceSpec, path: Path) -> Iterator[RawRecord | SourceRecordError]:
    """Records of a source file in file order; unreadable records come back as errors, not raised."""
    file = spec.path
    if spec.format == "jsonl":
        with open(path, "rb") as handle:
            yield from iter_jsonl_records(handle, file)
    elif spec.format == "jsonl.gz":
        with gzip.open(path, "rb") as handle:
            try:
                yield from iter_jsonl_records(handle, file)
            except (OSError, EOFError) as exc:
                raise SourceRecordError(file, 0, f"corrupt gzip stream ({exc})") from exc
    elif spec.format == "json":
        yield from _iter_json_array(path, file, spec.records)
    elif spec.format == "csv":
        with open(path, "rb") as binary:
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            try:
                yield from _iter_csv(text, file)
            except UnicodeDecodeError as exc:
                raise SourceRecordError(file, 0, f"invalid UTF-8 ({exc.reason}); expected UTF-8 CSV") from exc
    else:  # the registry validates formats; this guards programming errors
        raise ValueError(f"unsupported format {spec.format!r}")


# ---------------------------------------------------------------------------------------------
# mapping records to rows
# ---------------------------------------------------------------------------------------------
_MISSING = object()


def _lookup(record: Any, path: str) -> Any:
    value = record
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _field(record: Any, path: str, expect_str: bool = True) -> Any:
    optional = path.endswith("?")
    path = path.rstrip("?")
    value = _lookup(record, path)
    if value is _MISSING:
        if optional:
            return None
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"missing field {path!r} (record has {keys})")
    if expect_str and not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"field {path!r} must be a string, got {type(value).__name__}")
    return value


def _text(record: Any, paths: str | list[str]) -> str:
    if isinstance(paths, str):
        return _field(record, paths)
    parts = [_field(record, p) for p in paths]
    return "\n\n".join(p for p in parts if p and p.strip())


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH-RLHF "Human: … Assistant: …" transcript into messages."""
    if not text.startswith("\n\nHuman: "):
        text = "\n\n" + text.lstrip("\n")
    pieces = _TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise ValueError("expected a transcript of '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[pieces[i]], "content": pieces[i + 1].strip()} for i in range(1, len(pieces), 2)]


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(solution: str) -> str | None:
    """Content of the last \\boxed{…} (or \\fbox{…}) in a solution, braces balanced."""
    matches = list(_BOXED.finditer(solution))
    if not matches:
        match = re.findall(r"\\boxed ([^\s$]+)", solution)
        return match[-1] if match else None
    start = matches[-1].end()
    depth = 1
    for pos in range(start, len(solution)):
        ch = solution[pos]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return solution[start:pos].strip()
    return None


def extract_gsm8k_final(answer: str) -> str | None:
    """The number after GSM8K's final '####' marker, without thousands separators."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"gsm8k_final": extract_gsm8k_final, "boxed": extract_boxed}


def map_record(record: Any, mapping: MappingSpec) -> dict[str, Any]:
    """The row fields (messages, task fields, extra) for one record; raises ValueError naming the field."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    messages: list[dict[str, str]] = []
    extra: dict[str, Any] = {}
    if mapping.system is not None:
        system = _text(record, mapping.system)
        if system:
            messages.append({"role": "system", "content": system})
    if mapping.transcript is not None:
        turns = parse_hh_transcript(_field(record, mapping.transcript))
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"field {mapping.transcript!r}: transcript must end with an Assistant turn")
        messages.extend(turns[:-1])
        extra["chosen"] = turns[-1]["content"]
        if mapping.rejected_transcript is not None:
            rejected = parse_hh_transcript(_field(record, mapping.rejected_transcript))
            extra["rejected"] = rejected[-1]["content"]
            if rejected[:-1] != turns[:-1]:
                extra["rejected_messages"] = rejected
    if mapping.turns is not None:
        turns_value = _field(record, mapping.turns, expect_str=False)
        if not isinstance(turns_value, list) or not all(isinstance(t, str) for t in turns_value):
            raise ValueError(f"field {mapping.turns!r} must be a list of strings")
        messages.extend({"role": "user", "content": t} for t in turns_value)
    if mapping.user is not None:
        messages.append({"role": "user", "content": _text(record, mapping.user)})
    if mapping.assistant is not None:
        messages.append({"role": "assistant", "content": _text(record, mapping.assistant)})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError("expected a non-empty user prompt")

    ground_truth = None
    if mapping.ground_truth is not None:
        gt = mapping.ground_truth if isinstance(mapping.ground_truth, GroundTruthSpec) else GroundTruthSpec(field=mapping.ground_truth)
        value = _field(record, gt.field)
        ground_truth = _EXTRACTORS[gt.extract](value) if gt.extract else value
    constraints = None
    if mapping.constraints:
        constraints = json.dumps({p.rstrip("?"): _field(record, p, expect_str=False) for p in mapping.constraints}, sort_keys=True)
    for path in mapping.extra:
        value = _field(record, path, expect_str=False)
        if value is not None:
            extra[path.rstrip("?")] = value
    return {
        "messages": messages,
        "ground_truth": ground_truth,
        "constraints": constraints,
        "eval_id": _field(record, mapping.eval_id) if mapping.eval_id else None,
        "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None,
    }


def source_key(spec: SourceSpec, record: RawRecord) -> str:
    """``<file>:<line>`` for line-based files; ``<file>#<index>`` for JSON arrays, whose records may share a line."""
    if spec.format == "json":
        return f"{spec.path}#{record.index}"
    return f"{spec.path}:{record.line}"


def iter_source_rows(
    spec: SourceSpec,
    root: Path | None = None,
    on_bad: Callable[[BadRecord], None] | None = None,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """Rows of one source, in file order, after verifying the file's sha256 against the manifest.

    Without ``on_bad`` the first bad record raises `SourceRecordError`; with it, bad records are
    passed to ``on_bad`` (file, line, reason, raw bytes) and loading goes on.
    """
    for row, _line in iter_located_rows(spec, root, on_bad, verify):
        yield row


def iter_located_rows(
    spec: SourceSpec,
    root: Path | None = None,
    on_bad: Callable[[BadRecord], None] | None = None,
    verify: bool = True,
) -> Iterator[tuple[dict[str, Any], int]]:
    """Like `iter_source_rows`, with the line each record starts on (JSON-array records too)."""
    path = verify_file(spec, root) if verify else spec.local_path(root)
    for item in iter_raw_records(spec, path):
        if isinstance(item, SourceRecordError):
            if on_bad is None:
                raise item
            on_bad(BadRecord(spec.id, f"{spec.path}:{item.line}", item.line, item.reason, item.raw))
            continue
        key = source_key(spec, item)
        try:
            fields = map_record(item.value, spec.mapping)
        except (ValueError, IndexError, TypeError) as exc:
            error = SourceRecordError(spec.path, item.line, str(exc))
            if on_bad is None:
                raise error from exc
            on_bad(BadRecord(spec.id, key, item.line, str(exc), item.raw))
            continue
        row = {
            "row_id": make_row_id(spec.id, key, item.raw),
            "source": spec.id,
            "source_key": key,
            "license": spec.license,
            **fields,
        }
        if fields["eval_id"] is None and spec.role != "train":
            row["eval_id"] = f"{spec.id}:{item.index}"
        problems = row_problems(row)
        if problems:  # a mapping bug, not bad data: always loud
            raise SourceRecordError(spec.path, item.line, "; ".join(problems))
        yield row, item.line
