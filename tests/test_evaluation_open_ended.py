"""The open-ended sets judged against the parent checkpoint (MT-Bench first turn, Vicuna, Koala, WizardLM) and
AlpacaEval against its references: both orders per pair, what each record says about the judge, reuse of the
parent's saved answers (and what happens without them), low-confidence rows in the comparison. Fake backends
and a deterministic judge; no model."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import pytest

from tulu_pipeline.evaluation.benchmarks import BenchmarkConfig, get_benchmark, load_samples
from tulu_pipeline.evaluation.judge_scoring import (
    LOW_CONFIDENCE_RULE,
    PAIRWISE_TEMPLATE,
    PAIRWISE_TEMPLATE_VERSION,
    Judge,
)
from tulu_pipeline.evaluation.runner import evaluate
from tulu_pipeline.generation.spec import BackendSpec
from tulu_pipeline.storage import Store

OPEN_ENDED = ("mt_bench", "vicuna_bench", "koala", "wizardlm_testset")


def _outputs(prompt_text: str) -> tuple[str, str]:
    a = prompt_text.split("## Output (a)\n", 1)[1].split("## Output (b)", 1)[0]
    b = prompt_text.split("## Output (b)\n", 1)[1].split("Which output", 1)[0]
    return a, b


class FakeModel:
    def __init__(self, parameters: int):
        self.parameters = parameters

    def num_parameters(self) -> int:
        return self.parameters


class FakeBackend:
    """A generation backend whose replies are a function of the prompt; ``parameters`` gives it a model size."""

    def __init__(self, reply, model_id="fake", parameters=None):
        self.reply, self.model_id, self.calls, self.closed = reply, model_id, 0, False
        self.model = FakeModel(parameters) if parameters else None

    def generate(self, prompts, params):
        self.calls += len(prompts)
        return [[SimpleNamespace(text=self.reply(p))] for p in prompts]

    def close(self):
        self.closed = True


def prefers_good(prompt):
    """A deterministic judge: the output with a ✓ wins, whatever its position; otherwise "A"."""
    a, b = _outputs(prompt[0]["content"])
    return "[[B]]" if "✓" in b and "✓" not in a else "[[A]]"


def always_a(prompt):
    return "A"


# ---------------------------------------------------------------------------------------------
# the kind, the items, the judge
# ---------------------------------------------------------------------------------------------
def test_open_ended_sets_are_judged_against_the_parent_on_a_few_first_turns():
    from tulu_pipeline.evaluation.benchmarks import benchmark_config

    for name in OPEN_ENDED:
        spec = get_benchmark(name)
        assert spec.kind == "pairwise_vs_parent" and spec.suite == "unseen" and spec.metric == "win rate vs parent"
        config = benchmark_config(name, "cpu")
        assert config.sample_size <= 4 and config.max_new_tokens <= 64  # CPU run: a few short answers
        assert benchmark_config(name, "full").sample_size is None
    mt = load_samples("mt_bench", BenchmarkConfig(sample_size=5, seed=0))
    assert all(len(s.prompt) == 1 and s.reference["turns"] == 2 for s in mt)  # first turn only
    from tulu_pipeline.data.loaders import iter_source_rows
    from tulu_pipeline.data.registry import get_source

    first_turns = {r["row_id"]: r["messages"][0]["content"] for r in iter_source_rows(get_source("mt_bench"))}
    assert all(s.prompt[0]["content"] == first_turns[s.item_id] for s in mt)


def test_template_version_is_the_template_hash():
    assert PAIRWISE_TEMPLATE_VERSION == "pairwise-" + hashlib.sha256(PAIRWISE_TEMPLATE.encode()).hexdigest()[:12]


def test_judge_asks_both_orders_in_one_batch():
    backend = FakeBackend(prefers_good)
    judge = Judge(backend)
    verdicts = judge.pairwise_swapped([("q", "good ✓", "bad"), ("q", "bad", "good ✓"), ("q", "x", "y")])
    assert backend.calls == 6
    assert [(first[0], second[0]) for first, second in verdicts] == [("A", "B"), ("B", "A"), ("A", "A")]


def test_low_confidence_rule():
    small = Judge(FakeBackend(always_a, parameters=134_515_008))
    assert small.parameters == 134_515_008 and small.low_confidence_reasons() == [
        "judge has 135M parameters (< 7B)"]
    big_family = Judge(FakeBackend(always_a, parameters=70_000_000_000), same_family=True)
    assert big_family.info()["low_confidence"] and "policy's own family" in big_family.low_confidence_reasons()[0]
    assert not Judge(FakeBackend(always_a, parameters=70_000_000_000)).info()["low_confidence"]
    served = Judge(FakeBackend(always_a))  # an HTTP judge: size unknown, not of the family
    assert served.parameters is None and not served.info()["low_confidence"]
    assert served.info()["low_confidence_rule"] == LOW_CONFIDENCE_RULE


@pytest.mark.parametrize("benchmark", ["vicuna_bench", "alpaca_eval"])
def test_records_carry_the_judge_the_template_and_both_verdicts(benchmark):
    config = BenchmarkConfig(sample_size=4, seed=3)
    samples = load_samples(benchmark, config)
    judge = Judge(FakeBackend(prefers_good, model_id="judge-x", parameters=135_000_000), same_family=True)
    others = None if benchmark == "alpaca_eval" else ["meh"] * 4
    result = evaluate(benchmark, "sft-1", samples, config, responses=["a good answer ✓", "a good one ✓", "bad", "bad"],
                      judge=judge, parent_responses=others, parent={"checkpoint_id": "base_model", "source": "saved"}
                      if others else None)
    for record in result.records:
        details = json.loads(record["details"])
        assert details["judge"] == {"model_id": "judge-x", "backend": "FakeBackend", "method": "generate",
                                    "template_version": PAIRWISE_TEMPLATE_VERSION}
        assert set(details["verdicts"]) == {"model_first", "model_second"}
        assert set(details["raw"]) == {"model_first", "model_second"}
        if others:
            assert details["parent_response"] == "meh" and details["parent_checkpoint"] == "base_model"
    assert [r["score"] for r in result.records[:2]] == [1.0, 1.0]
    info = result.summary["judge_info"]
    assert info["model_id"] == "judge-x" and info["template_version"] == PAIRWISE_TEMPLATE_VERSION
    assert info["low_confidence"] and result.summary["low_confidence"]
    assert result.summary["metrics"]["wins"] == 2 and result.summary["metrics"]["position_consistency"] >= 0.5


def test_a_position_biased_judge_ties_every_pair():
    config = BenchmarkConfig(sample_size=3, seed=0)
    samples = load_samples("koala", config)
    result = evaluate("koala", "dpo-2", samples, config, responses=["x"] * 3, judge=Judge(FakeBackend(always_a)),
                      parent_responses=["y"] * 3, parent={"checkpoint_id": "sft-1", "source": "saved"})
    assert result.summary["score"] == 0.5 and result.summary["metrics"]["ties"] == 3
    assert result.summary["metrics"]["position_consistency"] == 0.0
    assert "position" in result.records[0]["reason"]


def test_a_checkpoint_without_a_parent_keeps_its_answers_unscored():
    config = BenchmarkConfig(sample_size=2, seed=0)
    result = evaluate("wizardlm_testset", "base_model", load_samples("wizardlm_testset", config), config,
                      responses=["one", "two"])
    assert result.summary["outputs_only"] and math.isnan(result.summary["score"])
    assert [r["response"] for r in result.records] == ["one", "two"] and result.summary["judge_info"] is None
    assert result.summary["parent_checkpoint"] is None


# ---------------------------------------------------------------------------------------------
# run_benchmark: the parent's saved answers, or what happens without them
# ---------------------------------------------------------------------------------------------
JUDGE = BackendSpec(kind="transformers", model="models/base_model", model_id="judge-135m")


class Builds:
    """A fake `build_backend`: each checkpoint answers its own way; the judge prefers a ✓."""

    def __init__(self):
        self.built: list[str] = []

    def __call__(self, spec, store):
        name = spec.model_id or spec.model
        self.built.append(name)
        if name == "judge-135m":
            return FakeBackend(prefers_good, model_id=name, parameters=134_515_008)
        answer = {"base_model": "meh", "sft-1": "a good answer ✓", "dpo-2": "meh again", "dpo-3": "fine"}[name]
        return FakeBackend(lambda prompt: answer, model_id=name)


def _home(tmp_path):
    store = Store(str(tmp_path))
    for checkpoint_id, manifest in (("base_model", None), ("sft-1", {}), ("dpo-2", {"start_checkpoint": "sft-1"})):
        store.write_json(f"models/{checkpoint_id}/config.json", {})
        if manifest is not None:
            store.write_json(f"models/{checkpoint_id}/training_manifest.json",
                             {"checkpoint_id": checkpoint_id, **manifest})
    return store


def _run(store, checkpoint_id, builds, config=BenchmarkConfig(sample_size=3, seed=0, max_new_tokens=16), **kwargs):
    from tulu_pipeline.evaluation.pipeline import run_benchmark

    return run_benchmark(store, "vicuna_bench", checkpoint_id, config, run_id="r", execution="in_process",
                         backend_spec=BackendSpec(model=f"models/{checkpoint_id}", model_id=checkpoint_id),
                         judge_spec=JUDGE, build=builds, log=lambda _: None,
                         backend_spec_for=lambda parent: BackendSpec(model=f"models/{parent}", model_id=parent),
                         **kwargs)


def _items(store, summary):
    return [json.loads(line) for line in store.read_bytes(summary["items_path"].split(store.root + "/", 1)[1])
            .decode().splitlines()]


def test_the_child_is_judged_against_the_parents_saved_answers(tmp_path):
    store = _home(tmp_path)
    builds = Builds()
    base = _run(store, "base_model", builds)
    assert builds.built == ["base_model"] and base["outputs_only"]  # no parent: no judge loaded
    builds.built.clear()
    sft = _run(store, "sft-1", builds)
    assert builds.built == ["sft-1", "judge-135m"]  # the base model's answers were read, not generated again
    assert sft["parent"] == {"checkpoint_id": "base_model", "source": "saved", "version": base["version"],
                             "run_id": "r"}
    assert sft["score"] == 1.0 and sft["low_confidence"] and sft["judge"] == "models/base_model"
    for item in _items(store, sft):
        assert item["details"]["parent_response"] == "meh" and item["details"]["parent_output_source"] == "saved"
        assert item["details"]["judge"]["template_version"] == PAIRWISE_TEMPLATE_VERSION
        assert item["details"]["verdicts"] == {"model_first": "A", "model_second": "B"}
    # a smaller sample is a prefix of the parent's: still read from its evaluation
    builds.built.clear()
    smaller = _run(store, "sft-1", builds, BenchmarkConfig(sample_size=2, seed=0, max_new_tokens=16))
    assert "base_model" not in builds.built and smaller["parent"]["source"] == "saved"


def test_a_parent_without_saved_answers_is_an_error_or_generated(tmp_path):
    from tulu_pipeline.evaluation.pipeline import MissingParentOutputs

    store = _home(tmp_path)
    builds = Builds()
    _run(store, "sft-1", builds, missing_parent="generate")  # sft-1 was never evaluated: dpo-2's parent
    _run(store, "base_model", builds, BenchmarkConfig(sample_size=3, seed=0, max_new_tokens=32))  # other answers
    with pytest.raises(MissingParentOutputs, match=r"materialize eval/vicuna_bench for partition base_model"):
        _run(store, "sft-1", builds, missing_parent="error")  # base's answers were made with other sampling
    builds.built.clear()
    dpo = _run(store, "dpo-2", builds, missing_parent="error")  # sft-1's own evaluation saved its answers
    assert builds.built == ["dpo-2", "judge-135m"] and dpo["parent"]["source"] == "saved"
    assert dpo["score"] == 0.0  # "meh again" loses to sft-1's "a good answer ✓" in both orders
    builds.built.clear()
    store.write_json("models/dpo-3/config.json", {})
    store.write_json("models/dpo-3/training_manifest.json", {"checkpoint_id": "dpo-3", "start_checkpoint": "dpo-2"})
    generated = _run(store, "dpo-3", builds, BenchmarkConfig(sample_size=3, seed=0, max_new_tokens=8))
    assert builds.built == ["dpo-3", "dpo-2", "judge-135m"]  # the parent answered here
    assert generated["parent"] == {"checkpoint_id": "dpo-2", "source": "generated"}
    assert all(i["details"]["parent_output_source"] == "generated" for i in _items(store, generated))
    store.fs.rm(store.path("models/dpo-2"), recursive=True)
    with pytest.raises(MissingParentOutputs, match="neither saved answers nor a model"):
        _run(store, "dpo-3", builds, BenchmarkConfig(sample_size=3, seed=0, max_new_tokens=4))


def test_comparison_marks_judged_rows_low_confidence_and_pairs_them_with_the_parent(tmp_path):
    from test_evaluation import _published

    from tulu_pipeline.evaluation.comparison import comparison_markdown, comparison_table, regression

    store = _home(tmp_path)
    builds = Builds()
    for checkpoint_id in ("base_model", "sft-1", "dpo-2"):
        _run(store, checkpoint_id, builds)
    _published(store, "gsm8k", "sft-1", [1, 0, 1])
    _published(store, "gsm8k", "base_model", [0, 0, 1])
    table = comparison_table(store)
    row = next(r for r in table["rows"] if r["benchmark"] == "vicuna_bench")
    assert row["low_confidence"] and set(row["cells"]) == {"sft-1", "dpo-2"}  # the base has no parent: no cell
    assert row["cells"]["sft-1"]["score"] == 1.0 and row["cells"]["sft-1"]["low_confidence"]
    assert row["deltas"]["sft-1"]["stage"] == "sft − base" and row["deltas"]["sft-1"]["delta"] == 0.5
    assert row["deltas"]["dpo-2"]["delta"] == -0.5 and row["deltas"]["dpo-2"]["down"] == 3
    gsm8k = next(r for r in table["rows"] if r["benchmark"] == "gsm8k")
    assert not gsm8k["low_confidence"] and not gsm8k["deltas"]["sft-1"]["low_confidence"]
    markdown = comparison_markdown(table)
    assert "| vicuna_bench | unseen | win rate vs parent | 3 |  | 100.0 [100.0, 100.0] ⚠ ‡ | 0.0 [0.0, 0.0] ⚠ ‡ |" in markdown
    assert "‡ = low confidence: scored by the judge judge-135m" in markdown and "7B parameters" in markdown
    assert "MT-Bench: first turn only" in markdown
    assert "| vicuna_bench | sft − base | +50.0 [+50.0, +50.0] |" in markdown and "▲‡" not in markdown  # p = 0.25
    assert "| gsm8k | dev | accuracy | 3 |" in markdown and "‡" not in markdown.split("| gsm8k |")[1].split("\n")[0]
    # the regression check reads a win rate against the parent: below a tie is a drop
    verdict = regression(store, "vicuna_bench", "dpo-2", max_drop=0.1, require_significant=False)
    assert not verdict.passed and verdict.metadata["drop"] == 0.5 and "low-confidence judge" in verdict.description
    assert regression(store, "vicuna_bench", "sft-1", max_drop=0.1).passed
    assert regression(store, "vicuna_bench", "base_model").passed


def test_through_the_generation_job_the_parent_answers_in_its_own_job(tmp_path):
    """Launcher mode: the checkpoint's answers, then (missing) its parent's, each from a generation job run
    with that model's spec; the judge loads here."""
    from tulu_pipeline.evaluation.pipeline import run_benchmark

    store = _home(tmp_path)
    jobs = []

    def run_job(requests_rel, output_rel, backend_spec, params):
        jobs.append((requests_rel, backend_spec.model_id, params.max_new_tokens))
        answer = {"sft-1": "a good answer ✓", "base_model": "meh"}[backend_spec.model_id]
        requests = [json.loads(line) for line in store.read_bytes(requests_rel).decode().splitlines()]
        store.write_jsonl(output_rel, [{"request_id": r["request_id"], "completions": [{"text": answer}]}
                                       for r in requests])

    builds = Builds()
    summary = run_benchmark(store, "mt_bench", "sft-1", BenchmarkConfig(sample_size=2, seed=0, max_new_tokens=8),
                            run_id="r", execution="launcher", run_job=run_job,
                            backend_spec=BackendSpec(model="models/sft-1", model_id="sft-1"), judge_spec=JUDGE,
                            build=builds, log=lambda _: None,
                            backend_spec_for=lambda parent: BackendSpec(model=f"models/{parent}", model_id=parent))
    assert [(model, tokens) for _, model, tokens in jobs] == [("sft-1", 8), ("base_model", 8)]
    assert jobs[1][0].startswith("reports/eval/mt_bench/sft-1/_generation/") and "/parent-base_model/" in jobs[1][0]
    assert builds.built == ["judge-135m"] and summary["execution"] == "launcher"
    assert summary["score"] == 1.0 and summary["parent"] == {"checkpoint_id": "base_model", "source": "generated"}
