"""Global batch semantics: presets state the published batch per optimizer step, and each launch splits it over its
processes, so a preset trains the same batch on one CPU or 64 GPUs (no torch needed: config arithmetic only)."""

from __future__ import annotations

import pytest

from tulu_pipeline.training.batch_layout import (
    WORLD_SIZE_ENV,
    BatchLayout,
    BatchSplitError,
    launch_world_size,
    split_global_batch,
)
from tulu_pipeline.training.dpo_config import DPO_PRESETS, DPOTrainingConfig
from tulu_pipeline.training.rlvr_config import RLVR_TRAINING_PRESETS
from tulu_pipeline.training.sft_config import SFT_PRESETS, SFTTrainingConfig


def _split(layout: BatchLayout) -> tuple[int, int]:
    return layout.per_device_batch_size, layout.gradient_accumulation_steps


def test_presets_state_the_published_global_batch():
    assert SFT_PRESETS["tulu3_8b"].global_batch_size == 128  # sequences (Tülu 3 SFT)
    assert DPO_PRESETS["tulu3_8b"].global_batch_size == 128  # pairs (Tülu 3 DPO)
    assert RLVR_TRAINING_PRESETS["tulu3_8b"].global_batch_size == 64 * 16  # prompts x samples (the preset's source)
    assert RLVR_TRAINING_PRESETS["olmo3_style"].global_batch_size == 64 * 8  # 7b_instruct_rl.sh


@pytest.mark.parametrize("world_size, sft, dpo, grpo", [
    (1, (8, 16), (1, 128), (16, 64)),
    (2, (8, 8), (1, 64), (16, 32)),
    (8, (8, 2), (1, 16), (16, 8)),
])
def test_tulu3_presets_split_over_1_2_and_8_processes(world_size, sft, dpo, grpo):
    for preset, expected, total in ((SFT_PRESETS["tulu3_8b"], sft, 128), (DPO_PRESETS["tulu3_8b"], dpo, 128),
                                    (RLVR_TRAINING_PRESETS["tulu3_8b"], grpo, 1024)):
        layout = preset.batch_layout(world_size, "tulu3_8b")
        assert (layout.world_size, layout.global_batch_size, _split(layout)) == (world_size, total, expected)
    # the per-process config trains its share: together the processes train the global batch
    per_process = SFT_PRESETS["tulu3_8b"].for_world_size(world_size)
    assert per_process.effective_batch_size * world_size == 128
    assert (per_process.learning_rate, per_process.max_length) == (5e-6, 4096)  # nothing else changes


@pytest.mark.parametrize("world_size, sft, dpo", [(1, (8, 1), (4, 2)), (2, (4, 1), (4, 1)), (8, (1, 1), (1, 1))])
def test_cpu_demo_presets_keep_their_batch(world_size, sft, dpo):
    assert _split(SFT_PRESETS["cpu_demo"].batch_layout(world_size)) == sft
    assert _split(DPO_PRESETS["cpu_demo"].batch_layout(world_size)) == dpo
    # one process: the config exactly as written (the CPU demo runs as it always did)
    assert SFT_PRESETS["cpu_demo"].for_world_size(1) == SFT_PRESETS["cpu_demo"]
    assert DPO_PRESETS["cpu_demo"].for_world_size(1) == DPO_PRESETS["cpu_demo"]
    demo = RLVR_TRAINING_PRESETS["cpu_demo"].batch_layout(1)
    assert (demo.global_batch_size, _split(demo)) == (8, (8, 1))


def test_micro_batch_never_exceeds_the_configured_one():
    assert _split(split_global_batch(128, 8, 64)) == (2, 1)  # the share is smaller than the micro-batch
    assert _split(split_global_batch(24, 5, 2)) == (4, 3)  # the largest divisor of the share within the bound
    assert _split(SFTTrainingConfig(per_device_batch_size=6, gradient_accumulation_steps=2).batch_layout(4)) == (3, 1)


def test_an_indivisible_batch_is_an_error_naming_preset_batch_world_size_and_what_divides():
    with pytest.raises(BatchSplitError) as error:
        SFT_PRESETS["tulu3_8b"].batch_layout(3, "tulu3_8b")
    message = str(error.value)
    for part in ("'tulu3_8b'", "128 sequences", "world size 3", "1, 2, 4, 8, 16, 32, 64, 128", "126 or 129"):
        assert part in message, (part, message)
    with pytest.raises(BatchSplitError, match=r"world size 256;.*divides \(256\)"):  # more processes than sequences
        SFT_PRESETS["tulu3_8b"].batch_layout(256)
    with pytest.raises(BatchSplitError, match="'cpu_demo'.*2 prompts x 4 samples.*world size 8.*: 1, 2;"):
        RLVR_TRAINING_PRESETS["cpu_demo"].batch_layout(8, "cpu_demo")
    with pytest.raises(BatchSplitError, match="this config: the global batch of 8 pairs"):
        DPOTrainingConfig().for_world_size(3)


def test_the_layout_is_what_the_manifest_records(monkeypatch):
    monkeypatch.setenv(WORLD_SIZE_ENV, "8")
    layout = DPO_PRESETS["tulu3_8b"].batch_layout(launch_world_size())
    assert layout.manifest() == {"world_size": 8, "global_batch_size": 128, "per_device_batch_size": 1,
                                 "gradient_accumulation_steps": 16, "unit": "pairs"}
    monkeypatch.delenv(WORLD_SIZE_ENV)
    assert launch_world_size() == 1


def test_each_trainer_refuses_an_indivisible_batch_before_loading_anything(monkeypatch, tmp_path):
    from tulu_pipeline.training.dpo import run_dpo
    from tulu_pipeline.training.rlvr import run_rlvr
    from tulu_pipeline.training.sft import run_sft

    monkeypatch.setenv(WORLD_SIZE_ENV, "3")  # as torchrun --nproc_per_node=3 sets it
    missing = tmp_path / "no-such-model"  # never opened: the batch is checked first
    extra = {"preset": "tulu3_8b"}
    with pytest.raises(BatchSplitError, match="'tulu3_8b'.*128 sequences.*world size 3"):
        run_sft([], [], missing, tmp_path / "sft", SFT_PRESETS["tulu3_8b"], manifest_extra=extra)
    with pytest.raises(BatchSplitError, match="'tulu3_8b'.*128 pairs.*world size 3"):
        run_dpo([], [], missing, tmp_path / "dpo", DPO_PRESETS["tulu3_8b"], manifest_extra=extra)
    with pytest.raises(BatchSplitError, match="'tulu3_8b'.*64 prompts x 16 samples.*world size 3"):
        run_rlvr([], [], missing, tmp_path / "grpo", RLVR_TRAINING_PRESETS["tulu3_8b"], manifest_extra=extra,
                 verifier=lambda row, text: (0.0, False))
    monkeypatch.setenv(WORLD_SIZE_ENV, "2")
    with pytest.raises(NotImplementedError, match="GRPO trains in one process"):
        run_rlvr([], [], missing, tmp_path / "grpo", RLVR_TRAINING_PRESETS["tulu3_8b"], verifier=lambda row, text: (0.0, False))
