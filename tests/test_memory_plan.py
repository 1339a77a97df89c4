"""The memory planner (`tulu plan`): parameter counts against transformers, the shape of its answers, refusals
that say what would fit, monotonicity, and planned against measured peak memory on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tulu_pipeline.cli import main as tulu
from tulu_pipeline.training.dpo_config import DPO_PRESETS, dpo_config
from tulu_pipeline.training.rlvr_config import RLVR_TRAINING_PRESETS, rlvr_training_config
from tulu_pipeline.training.memory_plan import (
    CONFIG_DIR,
    GIB,
    PlanError,
    fits,
    load_model_shape,
    plan_run,
    shipped_model_configs,
)
from tulu_pipeline.training.sft_config import SFT_PRESETS, sft_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"sft": (SFT_PRESETS, sft_config), "dpo": (DPO_PRESETS, dpo_config), "rlvr": (RLVR_TRAINING_PRESETS, rlvr_training_config)}


def transformers_parameter_count(name: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    config.pop("_comment")
    with torch.device("meta"):  # shapes only: no memory for the 8B
        model = LlamaForCausalLM(LlamaConfig(**config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m", "llama-3.1-8b"])
def test_parameter_count_equals_transformers(name: str) -> None:
    assert load_model_shape(name).parameter_count == transformers_parameter_count(name)


def test_shipped_configs_are_the_published_architectures() -> None:
    assert shipped_model_configs() == ["llama-3.1-8b", "smollm2-135m", "tiny-llama"]
    assert load_model_shape("smollm2-135m").parameter_count == 134_515_008  # SmolLM2-135M's model card: 135M
    assert round(load_model_shape("llama-3.1-8b").parameter_count / 1e9, 2) == 8.03  # Llama 3.1 8B: 8.03B


def test_a_model_directory_or_config_file_works_like_a_shipped_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((CONFIG_DIR / "smollm2-135m.json").read_text())
    assert load_model_shape(tmp_path).parameter_count == load_model_shape(tmp_path / "config.json").parameter_count
    assert load_model_shape(tmp_path).parameter_count == 134_515_008
    with pytest.raises(PlanError, match="neither a shipped config .*llama-3.1-8b"):
        load_model_shape(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlanError, match=r"lacks \['vocab_size', 'intermediate_size'"):
        load_model_shape(tmp_path / "bad")


@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m", "llama-3.1-8b"])
@pytest.mark.parametrize("stage", ["sft", "dpo", "rlvr"])
def test_every_shipped_preset_gets_an_answer(model: str, stage: str) -> None:
    presets, make = CONFIGS[stage]
    for preset in presets:
        gpus = 1 if preset == "cpu_demo" else 8  # the CPU demos' batches are too small to split over 8
        plan = plan_run(model, stage, make(preset), gpus=gpus, gpu_memory_gb=80, preset=preset)
        assert plan.total_bytes == sum(plan.components.values()) > 0
        assert plan.tokens_per_step > 0 and plan.step_seconds > 0
        assert fits(plan) or plan.suggestions or "nothing tried fits" in _refusal(plan)


def _refusal(plan) -> str:
    from tulu_pipeline.training.memory_plan import refusal_message

    return refusal_message(plan)


def test_tulu3_8b_sft_on_one_80gb_gpu_is_refused_with_what_would_fit(capsys) -> None:
    args = ["plan", "--stage", "sft", "--preset", "tulu3_8b", "--model", "llama-3.1-8b", "--gpus", "1",
            "--gpu-memory-gb", "80"]
    assert tulu(args) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    message = captured.err
    assert "llama-3.1-8b sft does not fit" in message and "80 GiB available on each of 1 GPU(s)" in message
    assert "what would fit:" in message
    for remedy in ("FSDP over", "--gpus", "CPU offload", "--offload", "LoRA r=16", "--lora 16"):
        assert remedy in message, remedy
    # each remedy it names does fit when asked for
    assert tulu(["plan", "--stage", "sft", "--preset", "tulu3_8b", "--model", "llama-3.1-8b", "--gpus", "1",
                 "--gpu-memory-gb", "80", "--sharding", "fsdp", "--offload"]) == 0


def test_tulu3_8b_fits_eight_80gb_gpus_with_fsdp() -> None:
    sft = plan_run("llama-3.1-8b", "sft", sft_config("tulu3_8b"), gpus=8, gpu_memory_gb=80, preset="tulu3_8b")
    dpo = plan_run("llama-3.1-8b", "dpo", dpo_config("tulu3_8b"), gpus=8, gpu_memory_gb=80, preset="tulu3_8b")
    assert sft.sharding.strategy == "fsdp" and sft.workload.micro_batch == 8 and sft.workload.accumulation == 2
    assert fits(sft) and fits(dpo)
    # the model state is DeepSpeed's 16 bytes per parameter over 8 shards, plus the unsharded working set
    state = sum(sft.components[k] for k in ("master_weights", "gradients", "optimizer"))
    assert 16 * sft.parameter_count / 8 <= state <= 16 * sft.parameter_count / 8 + 2 * GIB
    assert sft.tokens_per_step == 128 * 4096


def test_rlvr_8b_names_its_remedies_and_the_vllm_share() -> None:
    plan = plan_run("llama-3.1-8b", "rlvr", rlvr_training_config("tulu3_8b"), gpus=8, gpu_memory_gb=80, preset="tulu3_8b")
    assert not fits(plan)
    assert {"vllm_weights", "vllm_kv_cache", "reference_model"} <= set(plan.components)
    assert any("smaller micro-batch" in s for s in plan.suggestions)
    starved = plan_run("llama-3.1-8b", "rlvr", rlvr_training_config("tulu3_8b", vllm_gpu_memory_utilization=0.1), gpus=8,
                       gpu_memory_gb=80, preset="tulu3_8b")
    assert "raise vllm_gpu_memory_utilization" in _refusal(starved)


def test_json_answer_and_exit_code_when_it_fits(capsys) -> None:
    assert tulu(["plan", "--stage", "dpo", "--model", "smollm2-135m", "--gpus", "1", "--gpu-memory-gb", "24",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["fits"] is True and answer["suggestions"] == []
    assert answer["parameter_count"] == 134_515_008 and answer["stage"] == "dpo"
    assert set(answer["per_gpu_gib"]) == {"parameters", "master_weights", "gradients", "optimizer", "activations",
                                          "lm_head_and_loss", "runtime_overhead"}
    assert answer["total_gib"] == pytest.approx(sum(answer["per_gpu_gib"].values()), abs=0.01)
    assert set(answer["activations_gib"]) == {"without_checkpointing", "with_checkpointing"}
    assert answer["workload"]["micro_batch"] == 4 and answer["workload"]["unit"] == "pairs"
    assert {"tokens_per_step", "estimated_step_seconds", "hardware", "sharding"} <= set(answer)


def test_cli_errors_exit_2_with_the_reason(capsys) -> None:
    assert tulu(["plan", "--stage", "sft", "--model", "no-such-model", "--gpus", "1", "--gpu-memory-gb", "80"]) == 2
    assert "neither a shipped config" in capsys.readouterr().err
    # 8 x 1 sequences of cpu_demo cannot be split over 3 GPUs: the trainers' own error
    assert tulu(["plan", "--stage", "sft", "--model", "tiny-llama", "--gpus", "3", "--gpu-memory-gb", "80"]) == 2
    assert "cannot be split evenly over world size 3" in capsys.readouterr().err
    assert tulu(["plan", "--stage", "dpo", "--model", "tiny-llama", "--gpus", "1", "--gpu-memory-gb", "80",
                 "--lora", "16"]) == 2
    assert "LoRA is an SFT option" in capsys.readouterr().err


def test_plan_grows_with_the_micro_batch_and_shrinks_with_gpus() -> None:
    config = sft_config("tulu3_8b")
    by_micro = [plan_run("llama-3.1-8b", "sft", config, gpus=8, gpu_memory_gb=80, micro_batch=m).total_bytes
                for m in (1, 2, 4, 8)]
    assert by_micro == sorted(by_micro) and len(set(by_micro)) == 4
    by_gpus = [plan_run("llama-3.1-8b", "dpo", dpo_config("tulu3_8b"), gpus=g, gpu_memory_gb=80,
                        strategy="fsdp").total_bytes for g in (1, 2, 4, 8)]
    assert by_gpus == sorted(by_gpus, reverse=True) and len(set(by_gpus)) == 4
    plain = plan_run("llama-3.1-8b", "sft", config, gpus=8, gpu_memory_gb=80, checkpointing=False)
    checkpointed = plan_run("llama-3.1-8b", "sft", config, gpus=8, gpu_memory_gb=80, checkpointing=True)
    assert checkpointed.components["activations"] < plain.components["activations"]
    assert checkpointed.activations_without_checkpointing == plain.components["activations"]


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_plan_benchmark", REPO / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_planned_matches_measured_peak_memory_of_the_tiny_model(monkeypatch) -> None:
    """One DPO step of the tiny model in its own process: peak RSS within 20% of the plan."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    benchmark = _benchmark()
    case = {"model": "tiny-llama", "stage": "dpo", "micro_batch": 4, "seq_len": 512, "checkpointing": False}
    result = benchmark.run_case(case, REPO)
    assert result["measured_bytes"] > 0.3 * GIB  # the step really ran (the LM head's chunks dominate)
    assert 0.8 <= result["ratio_planned_over_measured"] <= 1.2, result
