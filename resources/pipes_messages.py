"""A Pipes message reader for local subprocesses that only ever parses whole lines.

Dagster's `PipesFileMessageReader` tails the message file with ``readline()``, which at the end of the file returns
whatever part of a line the writer has put there so far. A large message (a materialization with plots embedded as
base64, hundreds of KB) can be caught half-written: ``json.loads`` then fails in the reader thread and the message
is lost (seen as a DPO materialization without its metadata). This reader keeps a partial line until its newline
arrives.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from threading import Event

import dagster as dg


def tail_complete_lines(path: str, should_stop: Callable[[], bool], poll_seconds: float = 0.01) -> Iterator[str]:
    """Lines appended to ``path`` as they are completed (with their newline), until ``should_stop()`` and the
    file is drained; a last line without a newline is yielded at the end, as it is."""
    pending = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            piece = stream.readline()
            if piece:
                pending += piece
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif should_stop():
                if pending:
                    yield pending
                return
            else:
                time.sleep(poll_seconds)


class CompleteLineFileMessageReader(dg.PipesFileMessageReader):
    """`PipesFileMessageReader` whose reader thread parses complete lines only."""

    def _reader_thread(self, handler, is_resource_complete: Event) -> None:
        try:
            for line in tail_complete_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except:  # noqa: E722 - reported to Dagster and re-raised, as the reader it replaces does
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class CompleteLineTempFileMessageReader(dg.PipesTempFileMessageReader):
    """`PipesTempFileMessageReader` (the `PipesSubprocessClient` default) over `CompleteLineFileMessageReader`."""

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with tempfile.TemporaryDirectory() as tempdir:
            reader = CompleteLineFileMessageReader(os.path.join(tempdir, "messages"),
                                                   include_stdio_in_messages=self._include_stdio_in_messages)
            with reader.read_messages(handler) as params:
                yield params
