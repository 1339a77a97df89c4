"""The template-lineage check on a checkpoint asset (blocking, naming the first differing line) and the
``checkpoint_diff`` asset, materialized with Dagster on a temporary TULU_HOME."""

from __future__ import annotations

import dagster as dg
from test_checkpoint_diff import _checkpoint
from test_sft_support import bundled_rows, smollm2_tokenizer

from assets.lineage import TEMPLATE_CHECK, build_template_checks, checkpoint_diff
from resources import TuluStorage
from tulu_pipeline.mixing.publish import mix_info_path
from tulu_pipeline.templates.lineage import template_lineage
from tulu_pipeline.templates.chat_template import TULU_CHAT_TEMPLATE, apply_tulu_chat_template

DRIFTED = TULU_CHAT_TEMPLATE.replace("'<|user|>\\n'", "'<|user|>\\n\\n'")


def _fake_sft_asset(checkpoint_ids):
    """Stands in for sft_checkpoint: reports one checkpoint id per materialization (training is tested elsewhere)."""
    ids = iter(checkpoint_ids)

    @dg.asset(name="sft_checkpoint")
    def sft_checkpoint() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"checkpoint_id": next(ids)})

    return sft_checkpoint


def test_blocking_check_fails_when_the_training_template_drifted_from_the_mix(store):
    tulu = template_lineage(apply_tulu_chat_template(smollm2_tokenizer()))
    drifted_tokenizer = apply_tulu_chat_template(smollm2_tokenizer())
    drifted = template_lineage(drifted_tokenizer, template=DRIFTED, mask_rule=tulu["mask_rule"])
    store.write_json(mix_info_path("mixv"), {"mix_hash": "mixv", "template_lineage": tulu})
    for name, lineage in (("sft-ok", tulu), ("sft-drift", drifted)):
        store.write_json(f"models/{name}/training_manifest.json", {"mix_hash": "mixv", "template_lineage": lineage})

    (check,) = build_template_checks([dg.AssetKey("sft_checkpoint")])
    assert check.check_specs_by_output_name and next(iter(check.check_specs)).blocking
    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": TuluStorage(root=store.url)}
    asset = _fake_sft_asset(["sft-ok", "sft-drift"])
    ok = dg.materialize([asset, check], resources=resources, instance=instance)
    (evaluation,) = ok.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.check_name == TEMPLATE_CHECK

    bad = dg.materialize([asset, check], resources=resources, instance=instance, raise_on_error=False)
    (evaluation,) = bad.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    description = evaluation.description
    assert description.startswith("chat template differs: sft-drift ")
    assert drifted["chat_template_sha256"][:16] in description and tulu["chat_template_sha256"][:16] in description
    assert "line 4: sft-drift '' vs sft_mix@mixv 'What is 12 * 7?'" in description  # the extra blank line


def test_checkpoint_diff_asset_diffs_the_latest_two_checkpoints(store):
    rows = bundled_rows("gsm8k_train", 6)
    _checkpoint(store, "sft-one", "mix1", rows[:4], {"learning_rate": 1e-4})
    _checkpoint(store, "sft-two", "mix2", rows[1:6], {"learning_rate": 1e-4})
    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": TuluStorage(root=store.url)}
    asset = _fake_sft_asset(["sft-one", "sft-two"])
    dg.materialize([asset], resources=resources, instance=instance)
    dg.materialize([asset], resources=resources, instance=instance)
    result = dg.materialize([checkpoint_diff], resources=resources, instance=instance)
    metadata = result.asset_materializations_for_node("checkpoint_diff")[0].metadata
    assert metadata["pairs"].value == 1
    diff = store.read_json("reports/diff/sft-one__sft-two/diff.json")
    assert diff["rows"]["added"] == 2 and diff["rows"]["removed"] == 1
    assert "## `sft-two` vs `sft-one`" in metadata["diff"].value
