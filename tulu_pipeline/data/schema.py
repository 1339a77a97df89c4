"""The row schema every stage reads and writes.

A row is a dict with:
- ``row_id``: stable content address of the source line (same line → same id, on any machine);
- ``source``: registry id of the source; ``source_key``: ``<file>:<line>`` (or ``<file>#<index>`` for
  JSON arrays) locating the original record;
- ``license``: the source file's license, carried onto every row;
- ``messages``: ``[{"role", "content"}]`` with roles system/user/assistant;
- optional task fields ``ground_truth``, ``constraints`` (JSON text), ``eval_id`` (benchmark item id);
- ``extra``: JSON text with source-specific fields kept for later stages.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

ROW_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("license", pa.string(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("ground_truth", pa.string()),
        pa.field("constraints", pa.string()),
        pa.field("eval_id", pa.string()),
        pa.field("extra", pa.string()),
    ]
)

REQUIRED_FIELDS = ("row_id", "source", "source_key", "license", "messages")


def make_row_id(source: str, source_key: str, raw: bytes) -> str:
    """Content address of one source record: its source, location and exact bytes.

    The location is part of the address so that two identical lines in one file stay two rows
    (deduplication decides about them later, on the record).
    """
    digest = hashlib.sha256()
    for piece in (source.encode(), source_key.encode(), hashlib.sha256(raw).digest()):
        digest.update(len(piece).to_bytes(8, "big"))
        digest.update(piece)
    return f"{source}-{digest.hexdigest()[:24]}"


def split_source_key(source_key: str) -> dict[str, Any]:
    """``{"file", "line"}`` for ``<file>:<line>`` keys, ``{"file", "record_index"}`` for ``<file>#<index>``."""
    if "#" in source_key:
        file, _, index = source_key.rpartition("#")
        return {"file": file, "record_index": int(index)}
    file, _, line = source_key.rpartition(":")
    return {"file": file, "line": int(line)}


def row_problems(row: dict[str, Any]) -> list[str]:
    """Everything wrong with a row against the schema; an empty list means valid."""
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS if row.get(name) in (None, "")]
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            problems.append("messages must be a non-empty list of {role, content}")
        else:
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    problems.append(f"messages[{i}] must be an object, got {type(message).__name__}")
                    continue
                if message.get("role") not in ROLES:
                    problems.append(f"messages[{i}].role must be one of {ROLES}, got {message.get('role')!r}")
                if not isinstance(message.get("content"), str):
                    problems.append(f"messages[{i}].content must be a string")
    for name in ("ground_truth", "constraints", "eval_id", "extra"):
        if row.get(name) is not None and not isinstance(row[name], str):
            problems.append(f"{name} must be a string or null, got {type(row[name]).__name__}")
    return problems


def row_text(row: dict[str, Any]) -> str:
    """All message contents of a row, joined; the text that length and overlap are measured on."""
    return "\n".join(m["content"] for m in row["messages"])
