"""The default CPU demo, for real: SmolLM2-135M, the cpu_demo preset, a 250-row mix from the bundle.

About 2 minutes on 2 idle cores (plus the 30 s base-model conversion, shared by the session); benchmarks/sft.py --demo records
the timings. Asserts what the demo promises, never wall time: the training loss falls and the held-out loss
on a slice of the same sources improves over the base model.
"""

from __future__ import annotations

import pytest
from test_sft_support import bundled_rows

from tulu_pipeline.training.sft_config import SFT_PRESETS

MIX = [("gsm8k_train", 150, 19), ("code_alpaca", 60, 8), ("self_instruct_seed", 40, 5)]


@pytest.mark.slow
def test_cpu_demo_trains_smollm2(tmp_path, converted_base_model):
    from tulu_pipeline.models.base_model import generate_sample
    from tulu_pipeline.training.sft import run_sft

    base = converted_base_model.path
    train, heldout = [], []
    for source, n_train, n_heldout in MIX:
        rows = bundled_rows(source, n_train + n_heldout)
        train += rows[:n_train]
        heldout += rows[n_train:]
    result = run_sft(train, heldout, base, tmp_path / "sft", SFT_PRESETS["cpu_demo"])
    m = result.metrics
    losses = [point["loss"] for point in m["train_loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert m["heldout_loss_after"] < m["heldout_loss_before"] - 0.1
    assert m["steps"] == SFT_PRESETS["cpu_demo"].max_steps
    assert generate_sample(result.checkpoint_dir, "What is 12 + 30?")  # loads and generates
