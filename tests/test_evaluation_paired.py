"""Paired stage effects: the statistics on hand-checked values (and scipy's binomial test), the comparison
table's deltas and stage-effects markdown on results published for base → sft → dpo, the end-of-run summary
and what `tulu-evaluate` prints. No model: fixed scores published through the real publishing functions."""

from __future__ import annotations

import math

import pytest

from tulu_pipeline.evaluation import scoring
from tulu_pipeline.evaluation.benchmarks import BenchmarkConfig, load_samples
from tulu_pipeline.evaluation.paired import (
    excludes_zero,
    min_detectable_difference,
    paired_delta,
    sign_test_p,
)
from tulu_pipeline.evaluation.runner import build_result
from tulu_pipeline.storage import Store

Z = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.80


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ups, downs, expected", [
    (0, 0, 1.0),                 # nothing changed
    (5, 0, 2 / 32),              # 2 · (1/2)^5
    (0, 5, 2 / 32),
    (9, 1, 2 * (1 + 10) / 1024),  # 2 · (C(10,0) + C(10,1)) / 2^10
    (8, 2, 2 * (1 + 10 + 45) / 1024),
    (3, 3, 1.0),                 # the two tails overlap: capped at 1
    (1, 0, 1.0),
])
def test_sign_test_on_hand_checked_values(ups, downs, expected):
    assert sign_test_p(ups, downs) == pytest.approx(expected, rel=1e-12)


def _binomtest_p(k: int, n: int) -> float:
    """scipy.stats.binomtest's two-sided p at 0.5 where scipy is installed, else its definition: the
    probability of every outcome no likelier than the one seen."""
    try:
        from scipy.stats import binomtest
    except ImportError:
        pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
        return min(1.0, sum(p for p in pmf if p <= pmf[k] * (1 + 1e-7)))
    return binomtest(k, n, 0.5, alternative="two-sided").pvalue


def test_sign_test_agrees_with_the_binomial_test():
    for n in range(1, 41):
        for k in range(n + 1):
            assert sign_test_p(k, n - k) == pytest.approx(_binomtest_p(k, n), rel=1e-9, abs=1e-15), (k, n)


def test_minimum_detectable_difference():
    # diffs 1, 1, 0, 0: sd (ddof 1) = sqrt(1/3)
    assert min_detectable_difference([1, 1, 0, 0]) == pytest.approx(Z * math.sqrt(1 / 3) / 2)
    # no variation (nothing changed): the sd of a 0/1 score at 0.5 stands in
    assert min_detectable_difference([0.0] * 8) == pytest.approx(Z * 0.5 / math.sqrt(8))
    assert min_detectable_difference([1.0]) == pytest.approx(Z * 0.5)
    assert min_detectable_difference([]) is None
    # more items, smaller MDD
    assert min_detectable_difference([1, 0] * 32) < min_detectable_difference([1, 0] * 8)


def test_paired_delta_on_the_shared_items():
    parent = {f"i{k}": 0.0 for k in range(10)}
    child = {**parent, "i0": 1.0, "i1": 1.0, "i2": 1.0, "i3": 1.0, "i4": 1.0, "i5": 1.0, "i6": 1.0, "i7": 1.0}
    d = paired_delta(child, parent)
    assert (d["n"], d["changed"], d["up"], d["down"]) == (10, 8, 8, 0)
    assert d["delta"] == pytest.approx(0.8) and d["p_value"] == pytest.approx(2 / 256)
    assert 0 < d["ci_low"] <= 0.8 <= d["ci_high"] <= 1.0 and excludes_zero(d)
    assert d["same_items"] and d["child_only"] == d["parent_only"] == 0
    assert d == paired_delta(dict(reversed(child.items())), parent)  # seeded, order-free
    assert d["mdd"] == pytest.approx(Z * math.sqrt(0.8 * 0.2 * 10 / 9) / math.sqrt(10))

    same = paired_delta(parent, parent)
    assert same["delta"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0 and same["p_value"] == 1.0
    assert not excludes_zero(same) and same["mdd"] == pytest.approx(Z * 0.5 / math.sqrt(10))

    # different item sets: paired on the intersection, and said so
    partial = paired_delta({"a": 1.0, "b": 0.0, "c": 1.0}, {"b": 1.0, "c": 1.0, "d": 0.0})
    assert (partial["n"], partial["changed"], partial["down"], partial["delta"]) == (2, 1, 1, -0.5)
    assert not partial["same_items"] and partial["child_only"] == 1 and partial["parent_only"] == 1

    empty = paired_delta({"a": 1.0}, {"b": 1.0})
    assert empty["n"] == 0 and empty["delta"] is None and empty["mdd"] is None and not excludes_zero(empty)


def test_the_paired_interval_is_the_bootstrap_of_the_differences():
    child = {f"i{k}": float(k % 3 == 0) for k in range(12)}
    parent = {f"i{k}": float(k % 2 == 0) for k in range(12)}
    d = paired_delta(child, parent, resamples=500, seed=7)
    diffs = [child[i] - parent[i] for i in sorted(child)]
    assert (d["ci_low"], d["ci_high"]) == scoring.bootstrap_ci(diffs, 500, 7)


# ---------------------------------------------------------------------------------------------
# the comparison table on results published for base → sft → dpo
# ---------------------------------------------------------------------------------------------
GSM8K = {"base_model": [1, 1] + [0] * 14, "sft-1": [1] * 12 + [0] * 4, "dpo-2": [1] * 12 + [0] * 4}
# dpo-2 is scored on fewer MATH-500 items (another sample size): the pairing uses the shared ones
MATH500 = {"base_model": [0] * 8, "sft-1": [1, 0, 1, 0, 0, 0, 0, 0], "dpo-2": [1, 1, 1, 0, 0, 0]}
TRAINED_ROW = "gsm8k_train-00000000deadbeef"


def _publish(store, benchmark, checkpoint_id, scores):
    from tulu_pipeline.evaluation.results import publish_result

    config = BenchmarkConfig(sample_size=len(scores), seed=0)
    samples = load_samples(benchmark, config)
    items = [scoring.ItemScore(float(v), "fixed", {}) for v in scores]
    return publish_result(store, build_result(benchmark, checkpoint_id, samples, ["r"] * len(samples), items, config),
                          "run-1")


def _home(root) -> Store:
    from tulu_pipeline.provenance.ledger import LedgerWriter

    store = Store(str(root))
    store.write_json("models/base_model/tulu_model.json", {"weights_sha256": "abc"})
    store.write_json("models/sft-1/training_manifest.json", {"checkpoint_id": "sft-1"})
    store.write_json("models/dpo-2/training_manifest.json", {"checkpoint_id": "dpo-2", "start_checkpoint": "sft-1"})
    store.write_bytes("models/sft-1/loss_curve.png", b"\x89PNG")
    store.write_bytes("reports/audit/dpo-2/bill.md", b"# bill")
    for benchmark, per_checkpoint in (("gsm8k", GSM8K), ("math500", MATH500)):
        for checkpoint_id, scores in per_checkpoint.items():
            _publish(store, benchmark, checkpoint_id, scores)
    with LedgerWriter(store, "training", "sft", "v1", "run-1") as ledger:
        for row_id in ("gsm8k_train-ffff000000000000", TRAINED_ROW):
            ledger.record(row_id, "trained_on", decision="trained", related_ids=["sft-1"])
    return store


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("tulu_home")
    _home(root)
    return root


def test_comparison_table_carries_each_stages_paired_delta(home):
    from tulu_pipeline.evaluation.comparison import comparison_table

    table = comparison_table(Store(str(home)))
    assert table["columns"] == ["base_model", "sft-1", "dpo-2"]
    assert table["pairs"] == [{"child": "sft-1", "parent": "base_model", "stage": "sft − base"},
                              {"child": "dpo-2", "parent": "sft-1", "stage": "dpo − sft"}]
    gsm8k, math500 = table["rows"]
    assert set(gsm8k["cells"]) == {"base_model", "sft-1", "dpo-2"}  # the per-column cells are unchanged
    sft = gsm8k["deltas"]["sft-1"]
    assert (sft["parent"], sft["n"], sft["changed"], sft["up"], sft["down"]) == ("base_model", 16, 10, 10, 0)
    assert sft["delta"] == pytest.approx(10 / 16) and sft["p_value"] == pytest.approx(2 / 1024)
    assert sft["ci_low"] > 0 and sft["same_items"]
    dpo = gsm8k["deltas"]["dpo-2"]  # identical outputs: no change, and the MDD says how little 16 items can see
    assert (dpo["delta"], dpo["changed"], dpo["p_value"]) == (0.0, 0, 1.0)
    assert dpo["mdd"] == pytest.approx(Z * 0.5 / 4)
    partial = math500["deltas"]["dpo-2"]
    assert (partial["n"], partial["changed"], partial["parent_only"], partial["same_items"]) == (6, 1, 2, False)
    assert partial["delta"] == pytest.approx(1 / 6)
    assert table == comparison_table(Store(str(home)))  # seeded: the same table twice


def test_comparison_markdown_has_the_stage_effects(home):
    from tulu_pipeline.evaluation.comparison import comparison_markdown, comparison_table

    markdown = comparison_markdown(comparison_table(Store(str(home))))
    assert "| gsm8k | dev | accuracy | 16 | 12.5 [" in markdown  # the per-checkpoint table comes first, as before
    effects = markdown.split("### Stage effects", 1)[1]
    assert "| benchmark | stage | Δ ×100 [95% CI] | p | n (changed) | MDD ×100 | effect |" in effects
    assert "| gsm8k | sft − base | +62.5 [" in effects and "| 0.002 | 16 (10) |" in effects
    assert effects.count("▲") == 1 + effects.count("▲/▼")  # only sft − base on gsm8k excludes zero
    assert "| gsm8k | dpo − sft | +0.0 [+0.0, +0.0] | 1.000 | 16 (0) | 35.0 |  |" in effects
    assert "| math500 | dpo − sft | +16.7 [" in effects and "| 6 (1) † |" in effects
    assert "MDD" in effects.split("|---")[-1] and "different items" in effects


def test_run_summary_names_checkpoints_paths_and_commands(home, tmp_path, monkeypatch):
    from tulu_pipeline.evaluation.comparison import comparison_table
    from tulu_pipeline.evaluation.run_summary import SUMMARY_FILE, example_trained_row, write_run_summary

    monkeypatch.delenv("PORT", raising=False)
    store = Store(str(home))
    assert example_trained_row(store, ["base_model", "sft-1", "dpo-2"]) == TRAINED_ROW  # the smallest id
    summary = write_run_summary(store, comparison_table(store), prefix=".venv/bin/")
    assert (home / SUMMARY_FILE).read_text() == summary + "\n"
    assert summary.startswith("## Run summary\n\n### Stage effects") and "| gsm8k | sft − base | +62.5 [" in summary
    assert "| sft | `sft-1` | `base_model` | 2 |" in summary and "| dpo | `dpo-2` | `sft-1` | 2 |" in summary
    for path in (f"{home}/reports/eval/comparison/", f"{home}/reports/eval/<benchmark>/<checkpoint>/summary.json",
                 f"model `{home}/models/dpo-2`", f"training plots `{home}/models/sft-1/loss_curve.png`",
                 f"data bill `{home}/reports/audit/dpo-2/`"):
        assert path in summary, path
    for command in ("make ui ", "http://localhost:3000", f".venv/bin/tulu trace {TRAINED_ROW} --tree",
                    ".venv/bin/tulu diff sft-1 dpo-2", ".venv/bin/tulu audit checkpoint dpo-2 --markdown",
                    ".venv/bin/tulu rows eval/gsm8k/dpo-2", ".venv/bin/tulu-evaluate --sample-size N"):
        assert command in summary, command

    # nothing to pair yet, no ledger, no mix: the summary still says where things are and what to run
    bare = Store(str(tmp_path))
    bare.write_json("models/base_model/tulu_model.json", {"weights_sha256": "abc"})
    _publish(bare, "gsm8k", "base_model", [1, 0])
    text = write_run_summary(bare, comparison_table(bare), prefix="", ui_port="4000")
    assert "None yet" in text and "tulu trace <row_id> --tree" in text and "http://localhost:4000" in text


def test_tulu_evaluate_prints_the_summary_after_the_checkpoints(home, monkeypatch, capsys):
    import assets.evaluation as evaluation

    monkeypatch.setenv("TULU_HOME", str(home))
    monkeypatch.setattr(evaluation, "evaluate_all_checkpoints",
                        lambda checkpoints=None, run_config=None, force=False:
                        {"base_model": "unchanged", "sft-1": "evaluated", "dpo-2": "evaluated"})
    with pytest.raises(SystemExit) as exit_:
        evaluation.main([])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("base_model: unchanged (every benchmark current; --force re-runs)\nsft-1: evaluated\n"
                          "dpo-2: evaluated\n\n## Run summary\n")
    assert "| gsm8k | sft − base | +62.5 [" in out and f"tulu trace {TRAINED_ROW} --tree" in out
    assert out.rstrip("\n").endswith((home / "reports/eval/comparison/summary.md").read_text().rstrip("\n"))


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning", "ignore::dagster.PreviewWarning")
def test_eval_comparison_carries_the_summary(home):
    import dagster as dg

    from assets.evaluation import eval_comparison
    from resources import TuluStorage

    result = dg.materialize([eval_comparison], resources={"storage": TuluStorage(root=str(home))})
    metadata = result.asset_materializations_for_node("eval_comparison")[0].metadata
    assert "### Stage effects" in metadata["table"].value
    summary = (home / "reports/eval/comparison/summary.md").read_text()
    assert metadata["summary"].value == summary.rstrip("\n") and "## Run summary" in summary


def test_an_effect_needs_the_sign_test_too():
    from tulu_pipeline.evaluation.paired import significant

    parent = {f"i{k}": 0.0 for k in range(16)}
    child = {**parent, **{f"i{k}": 1.0 for k in range(4)}}  # 4 up, none down: the bootstrap excludes zero
    d = paired_delta(child, parent)
    assert excludes_zero(d) and d["p_value"] == pytest.approx(0.125)
    assert not significant(d)
    child = {**parent, **{f"i{k}": 1.0 for k in range(8)}}
    assert significant(paired_delta(child, parent))


def test_training_objectives_come_from_the_trainers_paired_held_out_effects(tmp_path):
    from tulu_pipeline.evaluation.comparison import comparison_markdown, comparison_table
    from tulu_pipeline.evaluation.run_summary import run_summary

    store = _home(tmp_path)
    # SFT lowered the loss of 12 of 12 held-out rows; DPO flipped 6 of 20 held-out pairs to chosen, none back
    loss = paired_delta({f"r{i}": 1.0 - 0.01 * i for i in range(12)}, {f"r{i}": 1.2 for i in range(12)})
    preferred = paired_delta({f"p{i}": float(i < 14) for i in range(20)}, {f"p{i}": float(i < 8) for i in range(20)})
    unchanged = paired_delta({f"p{i}": 0.5 for i in range(20)}, {f"p{i}": 0.5 for i in range(20)})
    store.write_json("models/sft-1/training_manifest.json",
                     {"checkpoint_id": "sft-1", "metrics": {"heldout_effect": {"loss": loss}}})
    store.write_json("models/dpo-2/training_manifest.json", {
        "checkpoint_id": "dpo-2", "start_checkpoint": "sft-1",
        "metrics": {"heldout_effect": {"preference_accuracy": preferred, "reward_accuracy": unchanged}}})
    table = comparison_table(store)
    rows = {(r["checkpoint"], r["key"]): r for r in table["objectives"]}
    assert set(rows) == {("sft-1", "loss"), ("dpo-2", "preference_accuracy"), ("dpo-2", "reward_accuracy")}
    assert rows["sft-1", "loss"]["stage"] == "sft − base" and rows["dpo-2", "preference_accuracy"]["stage"] == "dpo − sft"
    assert rows["dpo-2", "preference_accuracy"]["delta"] == pytest.approx(0.3)

    section = comparison_markdown(table).split("### Training objectives (held-out, paired)", 1)[1]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| held-out")}
    assert "| sft − base | -0.255 [" in lines["held-out SFT loss (nats/token)"]
    assert lines["held-out SFT loss (nats/token)"].endswith("| yes ▲ |")  # a lower loss is the improvement
    pair_line = lines["held-out pair accuracy, length-normalised (×100)"]
    assert "| dpo − sft | +30.0 [" in pair_line and "| 0.031 | 20 (6) |" in pair_line and pair_line.endswith("yes ▲ |")
    assert lines["held-out reward accuracy (×100)"].endswith("| not shown |")
    summary = run_summary(store, table, prefix="")
    assert summary.startswith("## Run summary\n\n### Training objectives (held-out, paired)")
    assert summary.index("### Training objectives") < summary.index("### Stage effects")
