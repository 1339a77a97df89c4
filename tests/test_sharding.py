"""Sharded training (tulu_pipeline.training.sharding) on two CPU ranks: torchrun, gloo, FSDP2, on the tiny Llama.

tests/sharding_driver.py trains SFT, DPO and GRPO updates (4 optimizer steps each, a checkpoint every 2) on seeded
global batches; the module fixture runs it as:

- ``ref``: one plain process, unsharded (the one-rank run on the same global batches);
- ``fsdp``: two ranks, fp32, uninterrupted;
- ``killed``: two ranks, rank 1 SIGKILLed while saving step 4 of SFT, relaunched (SFT resumes, DPO killed the
  same way), relaunched (DPO resumes, GRPO killed), relaunched (GRPO resumes);
- ``ac_offload``: two ranks, SFT with activation checkpointing and CPU offload;
- ``bf16``: two ranks, SFT with bf16 compute over fp32 master weights.

Tolerances: the two-rank losses equal the one-rank ones to LOSS_RTOL (the sum over ranks reorders fp32 additions;
measured max 5.8e-7); the exports differ by at most EXPORT_ATOL (4 Adam steps at lr 5e-3 amplify that reordering;
measured 2.4e-6); bf16 compute stays within BF16_RTOL of fp32 (measured 3.2e-5). Kill and resume, activation
checkpointing and CPU offload are exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_sft_support import save_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # torchrun launches, a rank killed with SIGKILL

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "sharding_driver.py"
METHODS = ("sft", "dpo", "grpo")
LOSS_RTOL = 1e-5
EXPORT_ATOL = 1e-5
BF16_RTOL = 1e-3
LAUNCH_TIMEOUT_S = 300


def _env() -> dict[str, str]:
    # PYTHONPATH: the driver runs as a script from tests/, and must import this checkout's tulu_pipeline.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], log: Path) -> int:
    with open(log, "a") as handle:
        return subprocess.run(command, env=_env(), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=LAUNCH_TIMEOUT_S).returncode


def _driver(model_dir: Path, out: Path, *options: str) -> list[str]:
    return [str(DRIVER), "--model-dir", str(model_dir), "--out", str(out), *options]


def _torchrun(model_dir: Path, out: Path, *options: str, expect_kill: bool = False) -> None:
    log = out.with_suffix(".log")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *_driver(model_dir, out, *options)]
    rc = _run(command, log)
    if expect_kill:
        assert rc != 0 and "exitcode: -9" in log.read_text(), f"rank 1 was not killed; see {log}"
    else:
        assert rc == 0, f"torchrun {options} failed (rc {rc}):\n{log.read_text()[-4000:]}"


def _result(out: Path, method: str) -> dict[str, Any]:
    return json.loads((out / method / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharding")
    model_dir = save_tiny_model(root / "tiny")
    outs = {name: root / name for name in ("ref", "fsdp", "killed", "ac_offload", "bf16")}
    rc = _run([sys.executable, *_driver(model_dir, outs["ref"], "--strategy", "none")], root / "ref.log")
    assert rc == 0, (root / "ref.log").read_text()[-4000:]
    _torchrun(model_dir, outs["fsdp"])
    # Each relaunch runs only what is left: the method killed last time (it resumes), then the next (killed).
    for methods, kill in (("sft", "sft:4"), ("sft,dpo", "dpo:4"), ("dpo,grpo", "grpo:4")):
        _torchrun(model_dir, outs["killed"], "--methods", methods, "--kill", kill, expect_kill=True)
    _torchrun(model_dir, outs["killed"], "--methods", "grpo")
    _torchrun(model_dir, outs["ac_offload"], "--methods", "sft", "--activation-checkpointing", "--cpu-offload")
    _torchrun(model_dir, outs["bf16"], "--methods", "sft", "--mixed-precision", "bf16")
    return outs


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 4
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("method", METHODS)
def test_each_rank_holds_half_of_the_parameters_and_optimizer_state(runs, method):
    result = _result(runs["fsdp"], method)
    for kind in ("param_numel", "optimizer_numel"):
        (local0, total), (local1, total1) = result[kind]
        assert total == total1 and local0 + local1 == total, (kind, result[kind])
        assert 0.45 <= local0 / total <= 0.55 and 0.45 <= local1 / total <= 0.55, (kind, result[kind])
    assert result["optimizer_numel"][0][1] == 2 * result["param_numel"][0][1]  # Adam's two moments, every parameter


@pytest.mark.parametrize("method", METHODS)
def test_two_rank_loss_trajectory_equals_one_rank_on_the_same_global_batch(runs, method):
    one, two = _result(runs["ref"], method), _result(runs["fsdp"], method)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["strategy"] == "fsdp"
    assert _max_rel(one["losses"], two["losses"]) <= LOSS_RTOL, (one["losses"], two["losses"])
    assert len(set(two["losses"])) == 4  # the updates move the loss: the comparison is not of constants


@pytest.mark.parametrize("method", METHODS)
def test_kill_9_mid_save_then_resume_gives_the_uninterrupted_weights(runs, method):
    import torch
    from safetensors.torch import load_file

    launches = [json.loads(line) for line in (runs["killed"] / method / "launches.jsonl").read_text().splitlines()]
    # The launch after the kill removed the half-written step-4 and resumed from step 2.
    assert {"resumed_from": 2, "removed_partials": ["step-4.partial"]} in launches, launches
    killed, whole = _result(runs["killed"], method), _result(runs["fsdp"], method)
    assert killed["losses"] == whole["losses"]
    resumed = load_file(runs["killed"] / method / "export" / "model.safetensors")
    uninterrupted = load_file(runs["fsdp"] / method / "export" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    unequal = [name for name in resumed if not torch.equal(resumed[name], uninterrupted[name])]
    assert not unequal, f"weights differ after resume: {unequal}"


@pytest.mark.parametrize("method", METHODS)
def test_consolidated_export_loads_and_equals_the_unsharded_model(runs, method):
    import torch
    from transformers import AutoModelForCausalLM

    export = runs["fsdp"] / method / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not FSDP's wrapper class: vLLM picks by this name
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    sharded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    unsharded = AutoModelForCausalLM.from_pretrained(runs["ref"] / method / "export", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(runs["ref"].parent / "tiny", dtype=torch.float32)
    a, b, s = sharded.state_dict(), unsharded.state_dict(), start.state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= EXPORT_ATOL
    assert max(float((a[k] - s[k]).abs().max()) for k in a) > 100 * EXPORT_ATOL  # training changed the weights
    assert sharded.lm_head.weight.data_ptr() == sharded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(sharded(ids).logits, unsharded(ids).logits, atol=1e-4)


def test_activation_checkpointing_and_cpu_offload_change_no_number(runs):
    plain, variant = _result(runs["fsdp"], "sft"), _result(runs["ac_offload"], "sft")
    assert variant["gradient_checkpointing"] and variant["cpu_offload"] and not plain["gradient_checkpointing"]
    assert variant["losses"] == plain["losses"] and variant["grad_norms"] == plain["grad_norms"]
    assert variant["param_numel"] == plain["param_numel"]


def test_bf16_compute_keeps_fp32_master_weights_and_tracks_fp32(runs):
    fp32, bf16 = _result(runs["fsdp"], "sft"), _result(runs["bf16"], "sft")
    assert bf16["mixed_precision"] == "bf16"
    assert bf16["master_dtypes"] == ["torch.float32"] and bf16["optimizer_dtypes"] == ["torch.float32"]
    assert 0 < _max_rel(fp32["losses"], bf16["losses"]) <= BF16_RTOL  # > 0: bf16 really computed


def test_sharding_config_and_misuse_fail_clearly():
    from pydantic import ValidationError

    from tulu_pipeline.training.sharding import DataParallel, shard_model
    from tulu_pipeline.training.sharding_config import ShardingConfig

    assert ShardingConfig().strategy == "none"
    with pytest.raises(ValidationError, match="cpu_offload=True needs strategy='fsdp'"):
        ShardingConfig(cpu_offload=True)
    with pytest.raises(ValidationError):
        ShardingConfig(strategy="zero3")
    import torch

    with pytest.raises(ValueError, match="launch with torchrun"):
        shard_model(torch.nn.Linear(2, 2), DataParallel(0, 1, 0, torch.device("cpu"), None))
