"""Where a job (training, generation, judging) reports its progress: Dagster (through dagster-pipes), stdout,
or nowhere.

A reporter is anything with ``log_metrics(step, metrics)`` and ``log(message)``. `run_sft` calls
``log_metrics`` at every logging step (loss, learning rate, tokens/s, ...) and ``log`` for events
(resuming, dropped rows, checkpoint published).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol, TextIO, runtime_checkable

METRICS_EVENT = "sft_metrics"


@runtime_checkable
class Reporter(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None: ...

    def log(self, message: str) -> None: ...


def metrics_line(step: int, metrics: dict[str, Any], event: str = METRICS_EVENT) -> str:
    """One JSON line for a logging step: ``{"event": "sft_metrics", "step": ..., <metrics>}`` (``dpo_metrics``,
    ``grpo_metrics`` for the other trainers)."""
    return json.dumps({"event": event, "step": step, **metrics}, sort_keys=True, default=float)


class NullReporter:
    """Keeps the history, prints nothing. ``event`` names the metric lines of the streaming reporters."""

    def __init__(self, event: str = METRICS_EVENT) -> None:
        self.event = event
        self.history: list[dict[str, Any]] = []
        self.messages: list[str] = []

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.history.append({"step": step, **metrics})

    def log(self, message: str) -> None:
        self.messages.append(message)


class PrintReporter(NullReporter):
    """Metrics as JSON lines and messages as plain lines on a stream (stdout by default)."""

    def __init__(self, stream: TextIO | None = None, event: str = METRICS_EVENT) -> None:
        super().__init__(event)
        self.stream = stream

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        super().log_metrics(step, metrics)
        self._write(metrics_line(step, metrics, self.event))

    def log(self, message: str) -> None:
        super().log(message)
        self._write(message)


class PipesReporter(NullReporter):
    """Streams to Dagster through a dagster-pipes context: each logging step is a ``context.log.info`` JSON line
    (shown live in the run's event log), each message a plain ``context.log.info`` line."""

    def __init__(self, pipes_context: Any, event: str = METRICS_EVENT) -> None:
        super().__init__(event)
        self.context = pipes_context

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        super().log_metrics(step, metrics)
        self.context.log.info(metrics_line(step, metrics, self.event))

    def log(self, message: str) -> None:
        super().log(message)
        self.context.log.info(message)


def loss_curve_png(
    curve: list[dict[str, Any]], heldout_before: float | None = None, heldout_after: float | None = None,
    title: str = "SFT training loss",
) -> bytes:
    """The training loss (per trained token) over optimizer steps, with the held-out loss before and after."""
    from tulu_pipeline.plots import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [point["step"] for point in curve]
    ax.plot(steps, [point["loss"] for point in curve], color="#4c72b0", label="train loss (per token)")
    if heldout_before is not None:
        ax.axhline(heldout_before, color="#c44e52", linestyle="--", label=f"held-out before {heldout_before:.3f}")
    if heldout_after is not None:
        ax.axhline(heldout_after, color="#55a868", linestyle="--", label=f"held-out after {heldout_after:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
