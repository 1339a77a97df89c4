"""The local Pipes message reader parses whole lines only: a large message caught half-written is not lost.

Dagster's own file reader hands ``readline()``'s partial line at the end of the file to ``json.loads``; a
materialization with embedded plots, written while the reader polls, then disappears (a DPO materialization
without its metadata, seen in CI). The writer here splits one message in two writes with a pause between them,
so the reader sees the first half on its own.
"""

from __future__ import annotations

import json
import os
import threading
import time

import dagster as dg
import pytest

from resources.pipes_messages import CompleteLineFileMessageReader, tail_complete_lines


class Handler:
    def __init__(self) -> None:
        self.messages, self.errors = [], []

    def handle_message(self, message) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin, exc_info) -> None:
        self.errors.append(exc_info[1])


def big_message() -> dict:
    return {"__dagster_pipes_version": "0.1", "method": "report_asset_materialization",
            "params": {"metadata": {"plot": {"raw_value": "x" * 300_000, "type": "md"}}}}


def write_in_two_pieces(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        os.fsync(f.fileno())
        time.sleep(0.3)  # the reader polls every 10 ms: it sees the first half alone
        f.write(text[len(text) // 2:])


def read_with(reader_cls, tmp_path) -> Handler:
    handler = Handler()
    reader = reader_cls(str(tmp_path / "messages"))
    with reader.read_messages(handler) as params:
        write_in_two_pieces(params["path"], json.dumps({"method": "opened", "params": {}}) + "\n")
        write_in_two_pieces(params["path"], json.dumps(big_message()) + "\n")
    return handler


def test_a_message_written_in_two_pieces_arrives_whole(tmp_path):
    handler = read_with(CompleteLineFileMessageReader, tmp_path)
    assert handler.errors == []
    assert [m["method"] for m in handler.messages] == ["opened", "report_asset_materialization"]
    assert handler.messages[1] == big_message()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its thread re-raises
def test_dagsters_own_reader_loses_it(tmp_path):
    # What the reader above replaces: if this starts failing, upstream fixed it and ours can go.
    handler = read_with(dg.PipesFileMessageReader, tmp_path)
    assert any(isinstance(e, json.JSONDecodeError) for e in handler.errors)
    assert big_message() not in handler.messages


def test_tail_complete_lines_waits_for_the_newline_and_drains_at_the_end(tmp_path):
    path = tmp_path / "f"
    path.write_text("a\n", encoding="utf-8")
    stop = threading.Event()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(tail_complete_lines(str(path), stop.is_set)))
    reader.start()
    with open(path, "a", encoding="utf-8") as f:
        f.write("b-first-half")
        f.flush()
        time.sleep(0.2)
        f.write(" b-second-half\nc-without-newline")
    stop.set()
    reader.join(timeout=10)
    assert lines == ["a\n", "b-first-half b-second-half\n", "c-without-newline"]
