"""The kill -9 half of the trainers' resume tests (SFT, DPO, GRPO), in one place.

A test runs its job uninterrupted, then calls `kill_9_after_first_checkpoint` with the same params and a
per-step delay (each job module reads its own STEP_DELAY_ENV), re-runs the job in-process and compares the
weights with `max_abs_weight_diff`. The helper waits on the events that matter, the first complete checkpoint
on disk or the job's exit, with no deadline of its own: pytest-timeout is the backstop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.training.checkpointing import CHECKPOINTS_DIR, PROGRESS_FILE


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def kill_9_after_first_checkpoint(module: str, params: dict[str, Any], checkpoint_dir: Path, work: Path,
                                  step_delay_env: str, step_delay: float) -> None:
    """Run ``python -m <module> --params <file>`` and SIGKILL it as soon as a complete checkpoint exists.

    `checkpoint_dir` is where the job publishes (its intermediate checkpoints live under CHECKPOINTS_DIR);
    `step_delay` seconds per optimizer step keep the job from finishing before the kill lands. Asserts that the
    job died of the signal and published nothing.
    """
    work.mkdir(parents=True, exist_ok=True)
    params_file = work / "params.json"
    params_file.write_text(json.dumps(params))
    log = work / "killed-job.log"  # a file, not a pipe: a chatty job can never block on a full pipe
    checkpoints = checkpoint_dir / CHECKPOINTS_DIR
    env = {**os.environ, step_delay_env: str(step_delay), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, "--params", str(params_file)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not any(checkpoints.glob(f"checkpoint-*/{PROGRESS_FILE}")):
            try:
                proc.wait(timeout=0.05)  # returns at once if the job exits
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"{module} exited with {proc.returncode} before its first complete checkpoint:\n"
                                 f"{_tail(log)}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"{module} finished (exit {proc.returncode}) before the kill landed; raise step_delay:\n{_tail(log)}")
    assert not (checkpoint_dir / MANIFEST_FILE).exists(), "the killed job published a checkpoint"


def kill_9_torchrun_after_first_checkpoint(module: str, params: dict[str, Any], checkpoint_dir: Path, work: Path,
                                          step_delay_env: str, step_delay: float, nproc: int = 2) -> None:
    """`kill_9_after_first_checkpoint` for a job launched by ``torchrun --nproc-per-node <nproc>``: as soon as a
    complete checkpoint exists, SIGKILL the torchrun agent and every rank at once (a lost node: nothing gets to
    clean up). torchrun starts each rank in its own session, so the ranks are found as the agent's children."""
    work.mkdir(parents=True, exist_ok=True)
    params_file = work / "params.json"
    params_file.write_text(json.dumps(params))
    log = work / "killed-torchrun.log"
    checkpoints = checkpoint_dir / CHECKPOINTS_DIR
    env = {**os.environ, step_delay_env: str(step_delay), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={nproc}", "-m", module, "--params", str(params_file)],
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        while not any(checkpoints.glob(f"checkpoint-*/{PROGRESS_FILE}")):
            try:
                agent.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"torchrun {module} exited with {agent.returncode} before its first complete "
                                 f"checkpoint:\n{_tail(log)}")
        ranks = _children(agent.pid)
        agent.send_signal(signal.SIGKILL)
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        agent.wait()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        for pid in ranks:  # reap nothing (not our children) but make sure they are gone before returning
            _wait_gone(pid)
    assert agent.returncode == -signal.SIGKILL and len(ranks) == nproc, (
        f"torchrun finished (exit {agent.returncode}, ranks {ranks}) before the kill landed; raise step_delay:\n"
        f"{_tail(log)}")
    assert not (checkpoint_dir / MANIFEST_FILE).exists(), "the killed job published a checkpoint"


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _wait_gone(pid: int) -> None:
    import time

    while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid):
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def load_weights(directory: Path) -> dict:
    """The tensors of ``directory/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def max_abs_weight_diff(a: Path, b: Path) -> float:
    """max |w_a - w_b| over every tensor of two checkpoints with the same keys."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
