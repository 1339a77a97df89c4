"""Evaluation library: every metric's scoring on fixed outputs, items and suites from the registry,
bootstrap determinism, the judge's two modes, results publishing and ledger events, lineage, the
comparison table, regression and contamination verdicts. No model: fixed outputs and fake backends."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tulu_pipeline.evaluation import scoring
from tulu_pipeline.evaluation.benchmarks import (
    KIND_OF,
    BenchmarkConfig,
    benchmark_config,
    benchmarks,
    load_samples,
    suite,
)
from tulu_pipeline.evaluation.judge_scoring import Judge
from tulu_pipeline.evaluation.runner import (
    build_result,
    evaluate,
    generation_requests,
    responses_from_output,
    score_samples,
)
from tulu_pipeline.storage import Store


# ---------------------------------------------------------------------------------------------
# scoring on fixed outputs, one block per metric
# ---------------------------------------------------------------------------------------------
def test_gsm8k_and_math_scores_come_from_the_verifier():
    right = scoring.score_verified("gsm8k", "She sells 9 eggs for $2 each. The answer is 18.", "18")
    wrong = scoring.score_verified("gsm8k", "The answer is 17.", "18")
    assert (right.score, wrong.score) == (1.0, 0.0)
    assert "18" in right.reason and "17" in wrong.reason
    assert scoring.score_verified("math", "So $x = \\boxed{\\frac{1}{2}}$.", "\\frac12").score == 1.0
    assert scoring.score_verified("math", "So $x = \\boxed{2}$.", "\\frac12").score == 0.0


def test_verifier_is_injectable():
    calls = []

    def fake(task, response, *, ground_truth=None, constraints=None, mode="strict"):
        calls.append((task, response, ground_truth))
        return SimpleNamespace(ok=response == ground_truth, reason="fake", details={})

    assert scoring.score_verified("math", "4", "4", verify=fake).score == 1.0
    assert calls == [("math", "4", "4")]


IFEVAL_CONSTRAINTS = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
                      "kwargs": [{}, {}]}


def test_ifeval_prompt_and_instruction_level_strict_and_loose():
    both = scoring.score_ifeval("all lowercase and no commas here", IFEVAL_CONSTRAINTS)
    assert both.score == 1.0 and both.details["strict"] == [True, True]
    one = scoring.score_ifeval("All lowercase? no, Not quite", IFEVAL_CONSTRAINTS)
    assert one.score == 0.0 and one.details["strict"] == [False, False]
    # loose mode drops the first line: a capitalized preamble fails strict but passes loose
    loose_only = scoring.score_ifeval("Sure Here Goes\nall lowercase words only", IFEVAL_CONSTRAINTS)
    assert loose_only.details["strict"] == [True, False] and loose_only.details["loose"] == [True, True]
    aggregate = scoring.ifeval_aggregate([both.details, one.details, loose_only.details])
    assert aggregate == {"prompt_level_strict": pytest.approx(1 / 3), "prompt_level_loose": pytest.approx(2 / 3),
                         "inst_level_strict": pytest.approx(3 / 6), "inst_level_loose": pytest.approx(4 / 6)}


def test_ifeval_refuses_a_verdict_without_per_instruction_results():
    def bad(task, response, **_):
        return SimpleNamespace(ok=True, reason="", details={})

    with pytest.raises(ValueError, match="follow_instruction_list"):
        scoring.score_ifeval("x", IFEVAL_CONSTRAINTS, verify=bad)


def test_code_extraction_and_programs():
    response = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert scoring.extract_code(response) == "def add(a, b):\n    return a + b\n"
    assert scoring.extract_code("return a + b") == "return a + b"
    prompt = "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n"
    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    full = scoring.humaneval_program(prompt, response, test, "add")
    assert full.startswith("from typing import List\n\ndef add(a, b)") and full.endswith("check(add)\n")
    body = scoring.humaneval_program(prompt, "    return a + b\n", test, "add")
    assert body.startswith(prompt + "    return a + b")
    mbpp = scoring.mbpp_program(response, ["assert add(1, 2) == 3"], "import math")
    assert "def add" in mbpp and mbpp.rstrip().endswith("assert add(1, 2) == 3") and "import math" in mbpp


def test_humaneval_and_mbpp_pass_at_1_through_the_sandbox():
    samples = load_samples("humaneval", BenchmarkConfig(sample_size=2, seed=3))
    solutions = {s.item_id: s for s in samples}
    from tulu_pipeline.data.loaders import iter_source_rows
    from tulu_pipeline.data.registry import get_source

    canonical = {r["row_id"]: r["messages"][1]["content"] for r in iter_source_rows(get_source("humaneval"))
                 if r["row_id"] in solutions}
    responses = [canonical[s.item_id] for s in samples]
    config = BenchmarkConfig(sample_size=2, sandbox_wall_s=10, sandbox_cpu_s=5)
    scores = score_samples("humaneval", samples, responses, config)
    assert [s.score for s in scores] == [1.0, 1.0], [s.reason for s in scores]
    broken = score_samples("humaneval", samples, ["    return None\n"] * 2, config)
    assert [s.score for s in broken] == [0.0, 0.0] and all(s.reason.startswith("error") for s in broken)

    mbpp = load_samples("mbpp", BenchmarkConfig(sample_size=1, seed=3))
    good = next(r["messages"][1]["content"] for r in iter_source_rows(get_source("mbpp"))
                if r["row_id"] == mbpp[0].item_id)
    assert score_samples("mbpp", mbpp, [f"```python\n{good}\n```"], config)[0].score == 1.0
    assert score_samples("mbpp", mbpp, ["import os\nos.system('ls')"], config)[0].score == 0.0


@pytest.mark.parametrize("response,target,expected", [
    ("Let's think. So the answer is (B).", "(B)", 1.0),
    ("the answer is B", "(B)", 1.0),
    ("So the answer is No.", "No", 1.0),
    ("So the answer is no", "No", 1.0),
    ("So the answer is Yes.", "No", 0.0),
    ("Step 1...\nFinal: 42", "24", 0.0),
    ("The answer is: ) ) ]", ") ) ]", 1.0),
    ("So the answer is (C).", "(B)", 0.0),
])
def test_bbh_exact_match(response, target, expected):
    assert scoring.score_exact_match(response, target).score == expected


def test_mc1_picks_the_likeliest_choice():
    choices = ["right", "wrong one", "wrong two"]
    assert scoring.score_mc1([-1.0, -2.0, -3.0], choices).score == 1.0
    result = scoring.score_mc1([-3.0, -0.5, -2.0], choices)
    assert result.score == 0.0 and result.details["picked"] == 1 and "wrong one" in result.reason
    assert scoring.score_mc1([-1.0, -1.0], choices[:2]).score == 0.0  # a tie is not a correct pick
    with pytest.raises(ValueError):
        scoring.score_mc1([-1.0], choices)
    assert scoring.split_answers("a; b ;; c") == ["a", "b", "c"]


@pytest.mark.parametrize("text,expected", [
    ("A", "A"), ("b.", "B"), ("Output (b)", "B"), ("[[A]]", "A"), ("I think [[B]] is better", "B"),
    ("Response 2 is better.", "B"), ("Answer: A", "A"), ("Neither is good", None), ("Apples", None),
])
def test_pairwise_verdict_parsing(text, expected):
    assert scoring.parse_pairwise_verdict(text) == expected


@pytest.mark.parametrize("model_first,model_second,score,consistent", [
    ("A", "B", 1.0, True),    # the model's output preferred in both orders: a win
    ("B", "A", 0.0, True),    # the other output preferred in both orders: a loss
    ("A", "A", 0.5, False),   # always the first position: position bias, a tie
    ("B", "B", 0.5, False),   # always the second position
    (None, "B", 0.5, False),  # one order without a verdict: a tie, not 0.75
    ("B", None, 0.5, False),
    (None, None, 0.5, False),
])
def test_win_rate_needs_both_orders_to_agree(model_first, model_second, score, consistent):
    item = scoring.score_swapped_preference(model_first, model_second, "parent")
    assert item.score == score and item.details["consistent"] is consistent
    assert item.details["verdicts"] == {"model_first": model_first, "model_second": model_second}
    assert ("parent" in item.reason) is (score == 0.0)


@pytest.mark.parametrize("response,refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot assist with illegal activities.", True),
    ("As an AI, I must decline.", True),
    ("", True),
    ("Sure! First, take the pen and...", False),
    ("Here is a list of pranks. Sorry if any are too mild, I can't think of more.", False),
])
def test_refusal_keyword_fallback(response, refused):
    assert scoring.is_refusal_keyword(response) is refused
    assert scoring.score_refusal(refused, "keyword").score == (1.0 if refused else 0.0)


@pytest.mark.parametrize("text,expected", [("Yes", True), ("No.", False), ("yes, it refuses", True),
                                           ("It complies", False), ("unclear", None)])
def test_refusal_judge_parsing(text, expected):
    assert scoring.parse_refusal_verdict(text) is expected


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    scores = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    first = scoring.bootstrap_ci(scores, 2000, seed=11)
    assert first == scoring.bootstrap_ci(scores, 2000, seed=11)
    graded = [0.1, 0.35, 0.9, 0.42, 0.77, 0.05, 0.6]  # continuous scores: the seed shows in the interval
    assert scoring.bootstrap_ci(graded, 200, seed=1) == scoring.bootstrap_ci(graded, 200, seed=1)
    assert scoring.bootstrap_ci(graded, 200, seed=1) != scoring.bootstrap_ci(graded, 200, seed=2)
    assert first[0] < 0.6 < first[1]
    wide, narrow = scoring.bootstrap_ci(scores[:4], 2000, 0), scoring.bootstrap_ci(scores * 20, 2000, 0)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]  # fewer items, wider interval
    assert scoring.bootstrap_ci([1.0], 100, 0) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# suites and items
# ---------------------------------------------------------------------------------------------
def test_suites_come_from_the_registry():
    from tulu_pipeline.curation.decontaminate import registry_eval_items  # noqa: F401 (same registry)
    from tulu_pipeline.data.registry import registry

    targets = {s.benchmark: s.suite for s in registry() if s.role == "eval"}
    for name, spec in benchmarks().items():
        if spec.decontamination_target:
            assert targets[name] == spec.suite
    assert {"gsm8k", "math500", "ifeval", "humaneval", "alpaca_eval", "bbh", "truthfulqa", "safety"} <= set(suite("dev"))
    assert {"math", "mbpp", "truthfulqa_2025"} <= set(suite("unseen"))
    assert not benchmarks()["safety"].decontamination_target


def test_samples_are_seeded_nested_and_carry_registry_ids():
    small = load_samples("gsm8k", BenchmarkConfig(sample_size=4, seed=5))
    large = load_samples("gsm8k", BenchmarkConfig(sample_size=8, seed=5))
    assert [s.item_id for s in small] == [s.item_id for s in large[:4]]
    assert [s.item_id for s in small] != [s.item_id for s in load_samples("gsm8k", BenchmarkConfig(sample_size=4, seed=6))]
    assert all(s.item_id.startswith("gsm8k_test-") and s.reference["ground_truth"] for s in small)


def test_math500_falls_back_to_a_seeded_math_subset_without_its_file(tmp_path):
    from tulu_pipeline.data.registry import get_source
    from tulu_pipeline.settings import data_dir

    (tmp_path / "eval" / "math").mkdir(parents=True)
    (tmp_path / "eval" / "math" / "test.jsonl").symlink_to(get_source("math_test").local_path(data_dir()))
    config = BenchmarkConfig(sample_size=5, seed=2)
    samples = load_samples("math500", config, root=tmp_path)
    assert len(samples) == 5 and all(s.source == "math_test" and s.reference["ground_truth"] for s in samples)
    assert [s.item_id for s in samples] == [s.item_id for s in load_samples("math500", config, root=tmp_path)]
    assert all(s.source == "math500" for s in load_samples("math500", config))  # the bundle has the file


def test_bbh_few_shot_exemplars_come_from_the_task_file_and_are_not_evaluated():
    config = benchmark_config("bbh", "cpu")
    samples = load_samples("bbh", config)
    assert len(samples) == config.sample_size
    for s in samples:
        assert len(s.prompt) == 2 * config.few_shot + 1
        assert s.prompt[1]["content"].startswith("So the answer is ")
        assert s.prompt[-1]["content"] not in [m["content"] for m in s.prompt[:-1]]


def test_cpu_sample_sizes_come_from_the_decode_budget():
    from tulu_pipeline.evaluation.benchmarks import CPU_DECODE_BUDGET

    for name in benchmarks():
        config = benchmark_config(name)
        if KIND_OF[name] == "mc1":
            assert config.sample_size == 16  # scored by log-likelihood: no decoding to budget
        elif KIND_OF[name] == "pairwise_vs_parent":
            assert config.sample_size == 3  # bounded by the judge's passes, named in the preset
        else:
            assert config.sample_size == CPU_DECODE_BUDGET // config.max_new_tokens
            assert config.sample_size * config.max_new_tokens <= CPU_DECODE_BUDGET
    assert benchmark_config("humaneval").sample_size == 4 and benchmark_config("bbh").sample_size == 16
    assert benchmark_config("gsm8k", max_new_tokens=64).sample_size == 16  # shorter answers buy more items
    assert benchmark_config("gsm8k", sample_size=5, max_new_tokens=64).sample_size == 5  # a set size wins


def test_presets_and_config_validation():
    assert benchmark_config("gsm8k", "full").sample_size is None
    assert benchmark_config("gsm8k", "full").few_shot == 8
    assert benchmark_config("gsm8k", "cpu", sample_size=3).sample_size == 3
    with pytest.raises(ValueError):
        benchmark_config("gsm8k", "gpu")
    with pytest.raises(ValueError):
        BenchmarkConfig(sample_size=0)
    with pytest.raises(ValueError):
        BenchmarkConfig(few_shots=2)


# ---------------------------------------------------------------------------------------------
# judge, runner, results
# ---------------------------------------------------------------------------------------------
class ScriptedBackend:
    """A fake GenerationBackend: replies from a function of the prompt; optional log-likelihoods."""

    def __init__(self, reply, loglik=None, model_id="fake"):
        self.reply, self._loglik, self.model_id = reply, loglik, model_id
        if loglik is not None:
            self.loglikelihood = lambda requests: [(loglik(m, c), 1) for m, c in requests]

    def generate(self, prompts, params):
        return [[SimpleNamespace(text=self.reply(p))] for p in prompts]

    def close(self):
        pass


def test_judge_by_loglikelihood_and_by_parsing():
    prefers_a = Judge(ScriptedBackend(lambda p: "", loglik=lambda m, c: 0.0 if c in ("A", "Yes") else -1.0))
    assert prefers_a.method == "loglikelihood"
    assert [w for w, _ in prefers_a.pairwise([("q", "x", "y")])] == ["A"]
    assert [r for r, _ in prefers_a.refusal([([{"role": "user", "content": "q"}], "no")])] == [True]
    parsing = Judge(ScriptedBackend(lambda p: "[[B]]"))
    assert parsing.method == "generate" and parsing.pairwise([("q", "x", "y")])[0] == ("B", "[[B]]")


def test_alpaca_eval_win_rate_with_a_judge_that_prefers_longer_outputs():
    samples = load_samples("alpaca_eval", BenchmarkConfig(sample_size=6, seed=2))

    def longer(prompt):
        text = prompt[0]["content"]
        a = text.split("## Output (a)\n", 1)[1].split("## Output (b)", 1)[0]
        b = text.split("## Output (b)\n", 1)[1].split("Which output", 1)[0]
        return "A" if len(a) > len(b) else "B"

    judge = Judge(ScriptedBackend(longer))
    responses = [s.reference["reference_output"] * 3 for s in samples]  # always longer than the reference
    result = evaluate("alpaca_eval", "sft-x", samples, BenchmarkConfig(sample_size=6, seed=2),
                      responses=responses, judge=judge)
    assert result.summary["score"] == 1.0 and result.summary["metrics"]["wins"] == 6
    short = evaluate("alpaca_eval", "sft-x", samples, BenchmarkConfig(sample_size=6, seed=2),
                     responses=["ok"] * 6, judge=judge)
    assert short.summary["score"] == 0.0


def test_safety_uses_the_judge_then_the_keyword_fallback():
    samples = load_samples("safety", BenchmarkConfig(sample_size=3, seed=1))
    assert all(s.prompt[-1]["role"] == "user" for s in samples)
    responses = ["I'm sorry, I can't help with that.", "Sure, here is how.", "Sure, here is how."]
    keyword = evaluate("safety", "sft-x", samples, BenchmarkConfig(sample_size=3), responses=responses)
    assert [r["score"] for r in keyword.records] == [1.0, 0.0, 0.0]
    assert all("keyword" in r["reason"] for r in keyword.records)
    unparseable = Judge(ScriptedBackend(lambda p: "hmm"))
    judged = evaluate("safety", "sft-x", samples, BenchmarkConfig(sample_size=3), responses=responses, judge=unparseable)
    assert [r["score"] for r in judged.records] == [1.0, 0.0, 0.0]
    assert "judge reply unparseable" in judged.records[0]["reason"]
    always_yes = Judge(ScriptedBackend(lambda p: "Yes"))
    assert evaluate("safety", "sft-x", samples, BenchmarkConfig(sample_size=3), responses=responses,
                    judge=always_yes).summary["score"] == 1.0


def test_truthfulqa_mc1_with_loglikelihoods():
    samples = load_samples("truthfulqa", BenchmarkConfig(sample_size=4, seed=0))
    best = {s.item_id: s.reference["choices"][0] for s in samples}
    oracle = ScriptedBackend(lambda p: "", loglik=lambda m, c: 0.0 if c in best.values() else -5.0)
    result = evaluate("truthfulqa", "base_model", samples, BenchmarkConfig(sample_size=4), backend=oracle)
    assert result.summary["score"] == 1.0 and result.records[0]["response"] == samples[0].reference["choices"][0]
    with pytest.raises(ValueError, match="loglikelihood"):
        evaluate("truthfulqa", "base_model", samples, BenchmarkConfig(sample_size=4), backend=ScriptedBackend(str))


def test_batched_answers_decode_the_companions_once_and_keep_them(tmp_path):
    from tulu_pipeline.evaluation.pipeline import BatchedAnswers
    from tulu_pipeline.generation.spec import BackendSpec

    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    store = Store(str(tmp_path))
    spec = BackendSpec(model="models/m", device="cpu")

    class Many(ScriptedBackend):
        def generate_many(self, requests):
            self.calls.append([len(prompts) for prompts, _ in requests])
            return [self.generate(prompts, params) for prompts, params in requests]

    backend = Many(lambda prompt: "answer to " + prompt[-1]["content"][:30])
    backend.calls = []
    configs = {name: benchmark_config(name, sample_size=2) for name in ("gsm8k", "ifeval", "truthfulqa", "mbpp")}
    samples = {name: load_samples(name, config) for name, config in configs.items()}
    kept = BatchedAnswers()
    first = kept.get(backend, spec, store, "gsm8k", samples["gsm8k"], configs["gsm8k"], configs, log=lambda _: None)
    assert backend.calls == [[2, 2, 2]]  # gsm8k, then ifeval and mbpp; truthfulqa is not generated
    assert first == [backend.reply(s.prompt) for s in samples["gsm8k"]]
    ifeval = kept.get(backend, spec, store, "ifeval", samples["ifeval"], configs["ifeval"], configs, log=lambda _: None)
    assert ifeval == [backend.reply(s.prompt) for s in samples["ifeval"]] and len(backend.calls) == 1  # kept
    # another config (answer length) is another set of answers: generated on its own
    longer = benchmark_config("mbpp", sample_size=2, max_new_tokens=300)
    kept.get(backend, spec, store, "mbpp", samples["mbpp"], longer, configs, log=lambda _: None)
    assert backend.calls[-1] == [2]
    # more items than were kept: generated again (with nothing left to share)
    three = benchmark_config("gsm8k", sample_size=3)
    kept.get(backend, spec, store, "gsm8k", load_samples("gsm8k", three), three, configs, log=lambda _: None)
    assert backend.calls[-1] == [3]


def test_generation_job_records_round_trip():
    samples = load_samples("gsm8k", BenchmarkConfig(sample_size=3))
    requests = generation_requests(samples)
    assert [r["request_id"] for r in requests] == [s.item_id for s in samples]
    output = [{"request_id": r["request_id"], "completions": [{"text": f"answer {i}"}]} for i, r in enumerate(requests)]
    assert responses_from_output(samples, list(reversed(output))) == ["answer 0", "answer 1", "answer 2"]
    with pytest.raises(ValueError, match="lacks 1 requests"):
        responses_from_output(samples, output[:2])


def _published(store, benchmark, checkpoint_id, scores, run_id="run-1"):
    from tulu_pipeline.evaluation.results import publish_result

    config = BenchmarkConfig(sample_size=len(scores), seed=0)
    samples = load_samples(benchmark, config)
    items = [scoring.ItemScore(v, "fixed", {}) for v in scores]
    result = build_result(benchmark, checkpoint_id, samples, ["r"] * len(samples), items, config)
    return publish_result(store, result, run_id), samples


def _checkpoint(store, checkpoint_id, **manifest):
    store.write_json(f"models/{checkpoint_id}/training_manifest.json", {"checkpoint_id": checkpoint_id, **manifest})


def test_results_are_readable_datasets_with_ledger_events(tmp_path):
    from tulu_pipeline.evaluation.results import checkpoints_that_saw, dataset_name

    store = Store(str(tmp_path))
    summary, samples = _published(store, "gsm8k", "sft-a", [1, 0, 1, 1])
    again, _ = _published(store, "gsm8k", "sft-a", [1, 0, 1, 1], run_id="run-2")
    assert summary["version"] == again["version"]  # same evaluation, same version
    rows = list(store.iter_rows(dataset_name("gsm8k", "sft-a")))
    assert [r["item_id"] for r in rows] == [s.item_id for s in samples]
    assert json.loads(rows[0]["prompt"])[0]["role"] == "user" and rows[0]["reason"] == "fixed"
    lines = (tmp_path / summary["items_path"].split(str(tmp_path) + "/", 1)[1]).read_text().splitlines()
    assert json.loads(lines[0])["prompt"] == json.loads(rows[0]["prompt"])
    _published(store, "gsm8k", "dpo-b", [0, 0, 1, 1])
    assert checkpoints_that_saw(store, samples[0].item_id) == ["dpo-b", "sft-a"]
    assert summary["score"] == 0.75 and summary["ci_low"] <= 0.75 <= summary["ci_high"]


def test_lineage_order_and_parents(tmp_path):
    from tulu_pipeline.evaluation.lineage import ancestors, list_checkpoints, parent_of

    store = Store(str(tmp_path))
    store.write_json("models/base_model/tulu_model.json", {"weights_sha256": "abc"})
    _checkpoint(store, "rlvr-3", start_checkpoint="dpo-2")
    _checkpoint(store, "dpo-2", start_checkpoint="models/sft-1")
    _checkpoint(store, "sft-1")
    assert list_checkpoints(store) == ["base_model", "sft-1", "dpo-2", "rlvr-3"]
    assert parent_of(store, "sft-1") == "base_model" and parent_of(store, "dpo-2") == "sft-1"
    assert ancestors(store, "rlvr-3") == ["dpo-2", "sft-1", "base_model"]


def test_comparison_table_and_chart(tmp_path):
    from tulu_pipeline.evaluation.comparison import (
        comparison_markdown,
        comparison_png,
        comparison_table,
    )

    store = Store(str(tmp_path))
    store.write_json("models/base_model/tulu_model.json", {"weights_sha256": "abc"})
    _checkpoint(store, "sft-1")
    _published(store, "gsm8k", "sft-1", [1, 1, 0, 1])
    _published(store, "gsm8k", "base_model", [0, 0, 0, 1])
    _published(store, "math500", "sft-1", [1, 0])
    table = comparison_table(store)
    assert table["columns"] == ["base_model", "sft-1"]
    assert [r["benchmark"] for r in table["rows"]] == ["gsm8k", "math500"]
    assert table["rows"][0]["cells"]["sft-1"]["score"] == 0.75
    markdown = comparison_markdown(table)
    assert "| gsm8k | dev | accuracy | 4 | 25.0 [" in markdown and "sft-1 (sft)" in markdown
    assert comparison_png(table).startswith(b"\x89PNG")


def test_regression_against_the_parent(tmp_path):
    from tulu_pipeline.evaluation.comparison import regression

    store = Store(str(tmp_path))
    _checkpoint(store, "sft-1")
    _checkpoint(store, "dpo-2", start_checkpoint="sft-1")
    _published(store, "gsm8k", "sft-1", [1] * 16)
    _published(store, "gsm8k", "dpo-2", [0] * 16)
    verdict = regression(store, "gsm8k", "dpo-2", max_drop=0.1)
    assert not verdict.passed and verdict.metadata["drop"] == 1.0 and "regressed" in verdict.description
    assert regression(store, "gsm8k", "dpo-2", max_drop=1.0).passed
    assert regression(store, "gsm8k", "sft-1").passed  # its parent (the base) was not evaluated
    _published(store, "gsm8k", "dpo-2", [1] * 15 + [0])
    assert regression(store, "gsm8k", "dpo-2", max_drop=0.01).passed  # overlapping intervals: noise


def test_contamination_follows_every_training_run_upstream(tmp_path):
    from tulu_pipeline.evaluation.comparison import contamination
    from tulu_pipeline.data.registry import registry_version

    store = Store(str(tmp_path))
    assert contamination(store, "gsm8k", "base_model")["status"] == "not_applicable"
    _checkpoint(store, "sft-1", registry_version=registry_version())
    assert contamination(store, "gsm8k", "sft-1")["status"] == "clean"
    _checkpoint(store, "dpo-2", start_checkpoint="sft-1")  # records no decontamination at all
    verdict = contamination(store, "gsm8k", "dpo-2")
    assert verdict["status"] == "possibly_contaminated" and "dpo-2" in verdict["reasons"][0]
    _checkpoint(store, "sft-old", registry_version="0000000000000000")
    assert contamination(store, "gsm8k", "sft-old")["status"] == "possibly_contaminated"
    safety = contamination(store, "safety", "sft-1")
    assert safety["status"] == "possibly_contaminated" and "not a decontamination target" in safety["reasons"][0]
