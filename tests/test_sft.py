"""SFT on a tiny random Llama with SmolLM2's tokenizer: loss, checkpoint, reductions, packing, resume, LoRA.

Resume tolerance: a run killed with SIGKILL after its first complete checkpoint and re-run resumes from the
newest complete checkpoint and ends with weights equal to an uninterrupted run's within
``RESUME_ATOL = 1e-5`` (max absolute difference over all tensors; on CPU in fp32 they are bit-identical,
the tolerance leaves room for nondeterministic kernels elsewhere).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from resume_helpers import kill_9_after_first_checkpoint, load_weights, max_abs_weight_diff
from test_sft_support import bundled_rows, save_tiny_model, smollm2_tokenizer

from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.layout import MANIFEST_FILE
from tulu_pipeline.models.base_model import weights_sha256
from tulu_pipeline.progress import NullReporter
from tulu_pipeline.storage import Store
from tulu_pipeline.training.batching import SFTCollator, pack_rows
from tulu_pipeline.templates.chat_template import (
    TULU_CHAT_TEMPLATE,
    apply_tulu_chat_template,
    encode_rows,
)
from tulu_pipeline.training.checkpointing import (
    CHECKPOINTS_DIR,
    RUN_FILE,
    mark_complete,
    prepare_run_dir,
    prune_checkpoints,
    remove_stale_siblings,
)
from tulu_pipeline.training.sft_config import (
    SFT_PRESETS,
    LoraSettings,
    SFTTrainingConfig,
    sft_config,
)
from tulu_pipeline.training.sft import STEP_DELAY_ENV, TRAINED_ROWS_FILE, run_sft

RESUME_ATOL = 1e-5
# 32 training rows, 4 per micro-batch, 2 micro-batches per step, 2 epochs: 8 optimizer steps.
TINY = SFTTrainingConfig(
    learning_rate=3e-3, num_epochs=2, per_device_batch_size=4, gradient_accumulation_steps=2, max_length=128,
    warmup_ratio=0.1, save_steps=3, logging_steps=1, max_steps=None, bf16=False, seed=7,
)
MANIFEST_EXTRA = {"mix_hash": "mix-test", "row_id_list_hash": "rows-test"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="module")
def rows() -> tuple[list[dict], list[dict]]:
    sample = bundled_rows("gsm8k_train", 24) + bundled_rows("code_alpaca", 16)
    train = sample[:18] + sample[24:38]
    heldout = sample[18:24] + sample[38:40]
    return train, heldout


@pytest.fixture(scope="module")
def trained(tiny_model, rows, tmp_path_factory):
    """One uninterrupted run with TINY (also run A of the resume test)."""
    train, heldout = rows
    reporter = NullReporter()
    out = tmp_path_factory.mktemp("run_a") / "sft"
    result = run_sft(train, heldout, tiny_model, out, TINY, reporter=reporter, manifest_extra=MANIFEST_EXTRA)
    return result, reporter


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_importing_the_training_modules_stays_cheap():
    """Dagster's process imports these for names and configs; torch/transformers/TRL load only to train."""
    code = ("import sys, tulu_pipeline.training.sft_job, tulu_pipeline.training.sft_config; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_presets():
    tulu = SFT_PRESETS["tulu3_8b"]
    assert (tulu.learning_rate, tulu.num_epochs, tulu.effective_batch_size, tulu.max_length, tulu.seed) == (
        5e-6, 2, 128, 4096, 123)
    assert (tulu.loss_reduction, tulu.warmup_ratio, tulu.lr_scheduler) == ("sum", 0.03, "linear")
    assert tulu.for_world_size(8).effective_batch_size * 8 == 128
    assert SFT_PRESETS["cpu_demo"] == SFTTrainingConfig()
    assert sft_config("cpu_demo", learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError):
        SFTTrainingConfig(unknown_field=1)
    with pytest.raises(ValueError):
        SFTTrainingConfig(loss_reduction="max")


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2], None) == [[0, 2, 1, 3]]
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([9, 2], 7) == [[0], [1]]  # too long for a row: a row of its own


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_per_sequence_losses(tiny_model, rows, attn):
    """A packed micro-batch gives every sequence exactly the loss it has alone (no cross-sequence attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = apply_tulu_chat_template(smollm2_tokenizer())
    examples = encode_rows(rows[0][:6], tokenizer, max_length=128).examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()

    def nll_sum(batch):
        batch = {k: v for k, v in batch.items() if k not in ("real_tokens", "computed_tokens")}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")

    trained = sum(sum(1 for label in ex["labels"][1:] if label != -100) for ex in examples)
    alone = sum(nll_sum(SFTCollator(tokenizer.pad_token_id, packing=False)([ex])) for ex in examples) / trained
    for cap in (None, 128, 300):
        batch = SFTCollator(tokenizer.pad_token_id, packing=True, max_row_tokens=cap)(examples)
        assert "attention_mask" not in batch
        packed = nll_sum(batch) / trained
        assert abs(float(packed - alone)) <= 1e-5, (cap, float(packed), float(alone))
    padded = nll_sum(SFTCollator(tokenizer.pad_token_id, packing=False)(examples)) / trained
    assert abs(float(padded - alone)) <= 1e-5
    # the same rows concatenated WITHOUT per-sequence positions do see each other: the check has teeth
    flat = SFTCollator(tokenizer.pad_token_id, packing=True, max_row_tokens=None)(examples)
    leaky = nll_sum({"input_ids": flat["input_ids"], "labels": flat["labels"]}) / trained
    assert abs(float(leaky - alone)) > 1e-3


def test_collator_reports_packing_efficiency():
    examples = [{"input_ids": [1] * n, "labels": [-100] + [1] * (n - 1)} for n in (10, 6, 4)]
    padded = SFTCollator(0, packing=False)(examples)
    assert (int(padded["real_tokens"]), int(padded["computed_tokens"])) == (20, 30)
    packed = SFTCollator(0, packing=True, max_row_tokens=10)(examples)
    assert (int(packed["real_tokens"]), int(packed["computed_tokens"])) == (20, 20)
    assert packed["position_ids"].tolist() == [list(range(10)), list(range(6)) + list(range(4))]
    assert packed["labels"][1, 6] == -100  # the second sequence's first token is not a target


# ---------------------------------------------------------------------------------------------
# a training run
# ---------------------------------------------------------------------------------------------
def test_training_loss_falls_and_heldout_improves(trained):
    result, reporter = trained
    m = result.metrics
    losses = [point["loss"] for point in m["train_loss"]]
    assert m["steps"] == 8 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and 0.5 < m["packing_efficiency"] <= 1.0
    assert m["resumed_from_step"] == 0
    assert (m["trained_rows_seen"], m["row_passes"]) == (32, 64)  # 2 epochs over 32 rows
    assert [h["step"] for h in reporter.history] == list(range(1, 9))
    assert {"loss", "learning_rate", "tokens_per_s"} <= reporter.history[0].keys()


def test_heldout_effect_pairs_the_heldout_rows(trained, rows):
    """The per-row paired change of the held-out loss: every held-out row, and the same direction as the
    aggregate held-out loss on this run, where training lowers it."""
    result, _ = trained
    m = result.metrics
    effect = m["heldout_effect"]["loss"]
    assert effect["n"] == m["heldout_rows"] == len(rows[1]) and effect["same_items"]
    aggregate_change = m["heldout_loss_after"] - m["heldout_loss_before"]
    assert aggregate_change < 0 and effect["delta"] < 0  # negative: the loss went down
    assert effect["ci_low"] <= effect["delta"] <= effect["ci_high"]
    assert effect["changed"] == effect["up"] + effect["down"] and effect["down"] > effect["up"]
    manifest = json.loads((result.checkpoint_dir / MANIFEST_FILE).read_text())
    assert manifest["metrics"]["heldout_effect"] == m["heldout_effect"]


def test_per_row_heldout_losses_weight_back_to_the_aggregate(tiny_model, rows):
    """`heldout_losses` gives `heldout_loss` and each row's own mean NLL per trained token from one pass: the
    rows' losses weighted by their trained tokens are the aggregate, and each is the row's loss scored alone
    (padding and batch neighbours change nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tulu_pipeline.training.sft import heldout_loss, heldout_losses

    tokenizer = apply_tulu_chat_template(smollm2_tokenizer())
    held = encode_rows(rows[1], tokenizer, max_length=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    result = heldout_losses(model, held.examples, tokenizer.pad_token_id, batch_size=3)  # padded, 3 batches
    aggregate = heldout_loss(model, held.examples, tokenizer.pad_token_id, batch_size=3)
    assert result.mean == aggregate
    assert result.row_tokens == [sum(label != -100 for label in ex["labels"][1:]) for ex in held.examples]
    weighted = sum(loss * n for loss, n in zip(result.row_losses, result.row_tokens)) / sum(result.row_tokens)
    assert weighted == pytest.approx(aggregate, rel=1e-12)
    assert len(set(result.row_losses)) == len(held.examples)  # per-row values, not the mean repeated
    for example, loss in zip(held.examples, result.row_losses):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([example["input_ids"]]),
                          labels=torch.tensor([example["labels"]])).loss
        assert loss == pytest.approx(float(alone), abs=1e-5)
    assert list(result.by_row(held.row_ids)) == [row["row_id"] for row in rows[1]]
    assert heldout_losses(model, [], tokenizer.pad_token_id).mean is None and heldout_loss(model, [], 0) is None


def test_checkpoint_loads_and_explains_itself(trained, tiny_model, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = trained
    out = result.checkpoint_dir
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "loss_curve.png", MANIFEST_FILE} <= names
    assert CHECKPOINTS_DIR not in names
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary leftovers
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache is True
    assert AutoTokenizer.from_pretrained(out).chat_template == TULU_CHAT_TEMPLATE
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["mix_hash"] == "mix-test" and manifest["row_id_list_hash"] == "rows-test"
    assert manifest["config"] == TINY.model_dump(mode="json") and manifest["seed"] == 7
    assert manifest["base_model_sha256"] == weights_sha256(tiny_model)
    assert manifest["sft_code_version"] and manifest["versions"]["trl"] and manifest["versions"]["torch"]
    assert manifest["metrics"]["heldout_loss_after"] == result.metrics["heldout_loss_after"]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    trained_ids = (out / TRAINED_ROWS_FILE).read_text().split()
    assert trained_ids == [row["row_id"] for row in rows[0]]  # every training row, in input order
    assert manifest["trained_row_ids_file"] == TRAINED_ROWS_FILE


def test_the_manifest_records_the_batch_layout(trained):
    result, _ = trained
    assert result.manifest["batch"] == {"world_size": 1, "global_batch_size": 8, "per_device_batch_size": 4,
                                        "gradient_accumulation_steps": 2, "unit": "sequences"}


def test_rerun_with_the_same_inputs_reuses_the_checkpoint(trained, tiny_model, rows):
    result, _ = trained
    again = run_sft(rows[0], rows[1], tiny_model, result.checkpoint_dir, TINY, manifest_extra=MANIFEST_EXTRA)
    assert again.reused and again.metrics == result.metrics


def test_two_independent_runs_give_identical_weights(trained, tiny_model, rows, tmp_path):
    """Determinism: the same rows, config and seed train bit-identical weights on CPU (a fresh directory, so
    nothing is reused)."""
    result, _ = trained
    again = run_sft(rows[0], rows[1], tiny_model, tmp_path / "again", TINY, manifest_extra=MANIFEST_EXTRA)
    assert not again.reused
    assert max_abs_weight_diff(result.checkpoint_dir, again.checkpoint_dir) == 0.0
    assert again.manifest["fingerprint"] == result.manifest["fingerprint"]


def test_loss_reduction_sum_vs_mean(tiny_model, rows, tmp_path):
    """One step over 8 rows (2 micro-batches of 4): mean = NLL per trained token of the step; sum = per
    micro-batch token sums averaged over the 2 micro-batches, so it (and its gradient) is N/2 times larger."""
    train = rows[0][:8]
    tokenizer = apply_tulu_chat_template(smollm2_tokenizer())
    trained_tokens = sum(sum(1 for label in ex["labels"][1:] if label != -100)
                         for ex in encode_rows(train, tokenizer, 128).examples)
    logs = {}
    for reduction in ("mean", "sum"):
        config = TINY.model_copy(update={"loss_reduction": reduction, "max_steps": 1, "max_grad_norm": None})
        reporter = NullReporter()
        run_sft(train, [], tiny_model, tmp_path / reduction, config, reporter=reporter)
        logs[reduction] = reporter.history[0]
    assert logs["sum"]["loss"] == pytest.approx(logs["mean"]["loss"], rel=1e-6)  # per-token loss is logged alike
    assert logs["mean"]["objective"] == pytest.approx(logs["mean"]["loss"], rel=1e-6)
    scale = trained_tokens / 2
    assert logs["sum"]["objective"] == pytest.approx(logs["mean"]["loss"] * scale, rel=1e-5)
    assert logs["sum"]["grad_norm"] == pytest.approx(logs["mean"]["grad_norm"] * scale, rel=1e-4)


def test_lora_trains_only_the_adapters(tiny_model, rows, tmp_path):
    config = TINY.model_copy(update={"lora": LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
                                     "max_steps": 2})
    result = run_sft(rows[0], rows[1], tiny_model, tmp_path / "lora", config)
    out = result.checkpoint_dir
    assert (out / "adapter" / "adapter_config.json").exists()
    base, merged = load_weights(tiny_model), load_weights(out)
    changed = {name for name in base if not (base[name] == merged[name]).all()}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    # 2 steps of 8 conversations: 16 of the 32 rows were trained on, and the checkpoint says which
    assert result.metrics["trained_rows_seen"] == 16
    assert len((out / TRAINED_ROWS_FILE).read_text().split()) == 16


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def test_run_dir_resumes_only_complete_checkpoints_of_the_same_run(tmp_path):
    messages = []
    root, resume = prepare_run_dir(tmp_path, "fp1", {}, messages.append)
    assert resume is None and (root / RUN_FILE).exists()
    for step in (2, 4, 6):
        (root / f"checkpoint-{step}").mkdir()
    mark_complete(root / "checkpoint-2", {"step": 2})
    mark_complete(root / "checkpoint-4", {"step": 4})  # checkpoint-6: killed while saving
    assert prepare_run_dir(tmp_path, "fp1", {}, messages.append) == (root, root / "checkpoint-4")
    assert not (root / "checkpoint-6").exists()
    mark_complete(root / "checkpoint-2", {"step": 2})
    (root / "checkpoint-8").mkdir()
    mark_complete(root / "checkpoint-8", {"step": 8})
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    root2, resume2 = prepare_run_dir(tmp_path, "fp2", {}, messages.append)
    assert resume2 is None and not list(root2.glob("checkpoint-*"))
    assert any("discarding the partial run" in m for m in messages)


def test_leftovers_of_an_interrupted_publish_are_removed(tmp_path):
    out = tmp_path / "sft-x"
    for name in (".sft-x.tmp-abc", ".sft-x.old-def", ".sft-y.tmp-keep"):
        (tmp_path / name).mkdir()
    removed = remove_stale_siblings(out)
    assert sorted(p.name for p in removed) == [".sft-x.old-def", ".sft-x.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sft-y.tmp-keep"]


def _job_home(tmp: Path, tiny_model: Path, rows) -> tuple[Store, dict]:
    import shutil

    store = Store(str(tmp / "tulu_home"))
    train, heldout = rows
    store.write_rows("sft_mix", "v1", train + heldout, ROW_SCHEMA)
    shutil.copytree(tiny_model, store.path("models/base_model"))
    params = {
        "tulu_home": store.url, "mix_dataset": "sft_mix", "mix_version": "v1",
        "heldout_row_ids": [row["row_id"] for row in heldout], "base_model_dir": "models/base_model",
        "checkpoint_dir": "models/sft-test", "config": TINY.model_dump(mode="json"), "manifest_extra": MANIFEST_EXTRA,
    }
    return store, params


@pytest.mark.integration
def test_resume_after_kill_9_matches_the_uninterrupted_run(trained, tiny_model, rows, tmp_path):
    result_a, _ = trained
    store, params = _job_home(tmp_path, tiny_model, rows)
    kill_9_after_first_checkpoint("tulu_pipeline.training.sft_job", params, Path(store.path("models/sft-test")),
                                  tmp_path / "killed", STEP_DELAY_ENV, 0.5)

    from tulu_pipeline.training.sft_job import run_job

    reporter = NullReporter()
    result_b, location = run_job(params, reporter)
    assert location == store.uri("models/sft-test")
    assert result_b.resumed_from_step > 0
    assert any("resuming from checkpoint-" in m for m in reporter.messages)
    assert result_b.metrics["steps"] == result_a.metrics["steps"]
    assert result_b.metrics["row_passes"] == result_a.metrics["row_passes"]
    diff = max_abs_weight_diff(result_a.checkpoint_dir, result_b.checkpoint_dir)
    print(f"resumed from step {result_b.resumed_from_step}; max |w_A - w_B| = {diff:.3g}")
    assert diff <= RESUME_ATOL
    # the loss curve spans the whole run, before and after the kill
    assert [p["step"] for p in result_b.metrics["train_loss"]] == [p["step"] for p in result_a.metrics["train_loss"]]


# ---------------------------------------------------------------------------------------------
# the entrypoint under Dagster
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sft_job_under_pipes_subprocess_client(tiny_model, rows, tmp_path):
    store, params = _job_home(tmp_path, tiny_model, rows)
    params["config"] = {**params["config"], "max_steps": 2}

    @dg.asset(required_resource_keys={"pipes"})
    def sft_checkpoint(context):  # (no annotations: this module's are strings, which Dagster does not resolve)
        return context.resources.pipes.run(command=[sys.executable, "-m", "tulu_pipeline.training.sft_job"], context=context,
                         extras=params, env={"HF_HUB_OFFLINE": "1"}).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([sft_checkpoint], resources={"pipes": dg.PipesSubprocessClient()}, instance=instance)
    assert result.success
    materialization = result.asset_materializations_for_node("sft_checkpoint")[0]
    metadata = materialization.metadata
    assert metadata["steps"].value == 2
    assert metadata["heldout_loss_after"].value < metadata["heldout_loss_before"].value
    assert metadata["heldout_effect"].value["loss"]["n"] == len(rows[1])
    assert metadata["checkpoint_path"].value == store.uri("models/sft-test")
    assert Path(metadata["loss_curve_path"].value).read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in metadata["loss_curve"].value
    assert {"final_loss", "tokens_per_s", "packing_efficiency", "resumed_from_step"} <= metadata.keys()
    logged = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.user_message]
    streamed = [json.loads(m) for m in logged if m.startswith("{") and '"sft_metrics"' in m]
    assert [line["step"] for line in streamed] == [1, 2]
    assert all({"loss", "learning_rate", "tokens_per_s"} <= line.keys() for line in streamed)


@pytest.mark.integration
def test_sft_job_under_torchrun_reports_and_publishes_once(tiny_model, rows, tmp_path):
    """Two ranks (CPU, gloo) as the Kubernetes launcher runs them with --nproc_per_node: one Pipes session,
    one materialization, one published checkpoint whose trained rows cover both ranks' shards."""
    store, params = _job_home(tmp_path, tiny_model, rows)
    params["config"] = {**params["config"], "max_steps": 2}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    @dg.asset(required_resource_keys={"pipes"})
    def sft_checkpoint(context):
        return context.resources.pipes.run(command=[*torchrun, "-m", "tulu_pipeline.training.sft_job"],
                                           context=context, extras=params,
                                           env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([sft_checkpoint], resources={"pipes": dg.PipesSubprocessClient()}, instance=instance)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("sft_checkpoint")
    assert materialization.metadata["steps"].value == 2
    manifest = json.loads((Path(store.path("models/sft-test")) / MANIFEST_FILE).read_text())
    trained = (Path(store.path("models/sft-test")) / TRAINED_ROWS_FILE).read_text().split()
    # The global batch of 8 rows (4 x 2 accumulation on one process) is split: each rank trains 4 rows per step in
    # one micro-batch. 2 steps x 8 rows: each rank saw its own shard, rank 0 counted both.
    assert manifest["batch"] == {"world_size": 2, "global_batch_size": 8, "per_device_batch_size": 4,
                                 "gradient_accumulation_steps": 1, "unit": "sequences"}
    assert len(trained) == manifest["metrics"]["trained_rows_seen"] == 16
    assert not list(Path(store.path("models")).glob(".sft-test.tmp-*"))


@pytest.mark.integration
def test_sft_job_with_an_object_store_home_trains_locally_and_uploads(tiny_model, rows, tmp_path, monkeypatch):
    import uuid

    from transformers import AutoModelForCausalLM

    from tulu_pipeline.training.sft_job import WORK_DIR_ENV, run_job

    store = Store(f"memory://tulu-sft-test-{uuid.uuid4().hex}")
    store.write_rows("sft_mix", "v1", rows[0] + rows[1], ROW_SCHEMA)
    for path in tiny_model.iterdir():
        store.fs.put_file(str(path), store.path("models/base_model", path.name))
    monkeypatch.setenv(WORK_DIR_ENV, str(tmp_path / "work"))
    params = {
        "tulu_home": store.url, "mix_version": "v1", "heldout_row_ids": [row["row_id"] for row in rows[1]],
        "base_model_dir": "models/base_model", "checkpoint_dir": "models/sft-remote",
        "config": {**TINY.model_dump(mode="json"), "max_steps": 1}, "manifest_extra": MANIFEST_EXTRA,
    }
    result, location = run_job(params, NullReporter())
    assert location == store.uri("models/sft-remote")
    uploaded = set(store.listdir("models/sft-remote"))
    assert {MANIFEST_FILE, "model.safetensors", "config.json", "tokenizer.json", "loss_curve.png"} <= uploaded
    assert CHECKPOINTS_DIR not in uploaded
    local = tmp_path / "downloaded"
    local.mkdir()
    for name in uploaded:
        store.fs.get_file(store.path("models/sft-remote", name), str(local / name))
    AutoModelForCausalLM.from_pretrained(local)
    assert json.loads((local / MANIFEST_FILE).read_text())["metrics"]["steps"] == 1
    assert result.metrics["heldout_rows"] == len(rows[1])
