"""The preference assets under dg.materialize on a tiny TULU_HOME: a fake launcher stands in for the
generation and judge processes (fake backends behind the same file contracts), so the test checks the
asset wiring, datasets, ledger events, quarantines and blocking checks without loading a model."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from test_preference import FakeScorer
from test_sft_support import bundled_rows

from assets.preference import GENERATION_JOB, JUDGE_JOB, preference_assets
from resources import ComputeLauncher, TuluStorage
from resources.generation import GenerationResource, JudgeResource
from tulu_pipeline.curation.pipeline import record_check_results
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.generation.base import Completion, SamplingParams
from tulu_pipeline.preference.judge import LoglikelihoodJudge, run_judging
from tulu_pipeline.preference.pairs import require_pair_checks_passed
from tulu_pipeline.preference.schema import PAIR_SCHEMA
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.storage import Store

pytestmark = pytest.mark.integration  # whole Dagster materializations


def _requests(store: Store, rel: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(rel).decode().splitlines() if line.strip()]


LAUNCHED: list[str] = []
HUMAN_SOURCES = ["fine_grained_rlhf_qa", "hh_rlhf_harmless"]
# Tülu 3's judged recipe, which the CPU defaults leave for verified pairs: every prompt source, the base model in
# the pool, every completion judged, human pairs ingested
JUDGED_PATH = {"judged_completions": {"config": {"judge_verifiable": True}}}


class FakeLauncher(ComputeLauncher):
    """Runs the two jobs' file contracts in-process. Outputs carry [r=K] marks that FakeScorer rates K:
    the SFT model beats the base model, prompt 0's SFT answers quote a GSM8K test question (an eval
    overlap), and prompt 1's answers all rate 3 like the reference replies (a tie)."""

    eval_text: str

    def run(self, context, module, extras, **hints):
        store = Store(extras["tulu_home"])
        LAUNCHED.append(module)  # module-level: Dagster hands the asset a copy of the resource
        if module == GENERATION_JOB:
            params = SamplingParams.from_json(extras["params"])
            model_id = extras["backend"]["model_id"]
            out = []
            for i, request in enumerate(_requests(store, extras["requests"])):
                completions = []
                for j in range(params.n):
                    if i == 1:
                        text = f"[r=3] {model_id} says something average {j}"
                    elif model_id.startswith("sft-"):
                        text = f"[r=5] {self.eval_text}" if i == 0 else f"[r=5] a careful answer {i}.{j}"
                    else:
                        text = f"[r=2] a sloppy answer {i}.{j}"
                    completions.append(Completion(text, model_id, "stop", 10, 8, params.seed + i,
                                                  params.to_json(), j).to_json())
                out.append({"request_id": request["request_id"], "completions": completions})
            store.write_jsonl(extras["output"], out)
        elif module == JUDGE_JOB:
            judge = LoglikelihoodJudge(FakeScorer(), extras["judge"]["judge_id"])
            run_judging(store, extras["requests"], extras["output"], judge)
        else:
            raise AssertionError(f"unexpected module {module}")


@pytest.fixture
def tiny_home(tmp_path):
    store = Store(str(tmp_path / "home"))
    pool = (bundled_rows("gsm8k_train", 6) + bundled_rows("self_instruct_seed", 6) + bundled_rows("hh_rlhf_harmless", 5)
            + bundled_rows("hh_rlhf_harmless", 1, skip=667) + bundled_rows("fine_grained_rlhf_qa", 5))
    store.write_rows("decontaminated_prompts", "d1", pool, ROW_SCHEMA)
    record_check_results(store, "d1", {"no_eval_overlap": True, "schema_valid": True, "unique_row_ids": True})
    store.write_rows("sft_mix", "m1", pool[:2] + pool[6:8], ROW_SCHEMA)
    evals = bundled_rows("gsm8k_test", 30)
    store.write_rows("raw/gsm8k_test", "e1", evals, ROW_SCHEMA)
    store.write_json("models/sft-fake/training_manifest.json", {"checkpoint_id": "sft-fake"})
    return store, pool, evals[0]["messages"][0]["content"]


def test_preference_assets_materialize(tiny_home, tmp_path):
    store, pool, eval_text = tiny_home
    launcher = FakeLauncher(eval_text=eval_text)
    LAUNCHED.clear()
    config = {"ops": JUDGED_PATH | {
        "preference_prompts": {"config": {"size": 6, "seed": 1, "sources": None}},
        "policy_completions": {"config": {"samples_per_model": 2, "max_new_tokens": 16, "include_base": True}},
        "preference_pairs": {"config": {"eval_suites": ["dev"], "eval_benchmarks": ["gsm8k"], "rank_by": "auto",
                                        "human_sources": HUMAN_SOURCES, "human_rows_per_source": None}},
    }}
    resources = {"storage": TuluStorage(root=store.url), "launcher": launcher,
                 "generation": GenerationResource(), "judge": JudgeResource()}
    result = dg.materialize(preference_assets, resources=resources, run_config=config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert LAUNCHED == [GENERATION_JOB, GENERATION_JOB, JUDGE_JOB]  # one launch per model, then the judge

    prompts = list(store.iter_rows("preference_prompts"))
    assert len(prompts) == 6 and not {p["row_id"] for p in prompts} & {r["row_id"] for r in pool[:2] + pool[6:8]}
    completions = list(store.iter_rows("policy_completions"))
    assert {c["model_id"] for c in completions} == {"sft-fake", "base_model", "dataset_reference"}
    assert len(completions) == 6 * (2 + 2 + 1)
    assert all(json.loads(c["params"])["max_new_tokens"] == 16 for c in completions if c["model_role"] != "reference")
    judged = list(store.iter_rows("judged_completions"))
    assert len(judged) == len(completions) and {j["rubric_version"] for j in judged} == {"ultrafeedback-v1"}
    assert all(1 <= j["mean_expected"] <= 5 for j in judged)

    pairs = list(store.iter_rows("preference_pairs"))
    assert store.dataset_info("preference_pairs").rows == len(pairs) and pairs
    on_policy = [p for p in pairs if p["origin"] == "on_policy"]
    human = [p for p in pairs if p["origin"] == "human"]
    assert len(on_policy) == 4  # 6 prompts - the tie - the eval overlap
    assert all(p["chosen_model"] == "sft-fake" and p["chosen_rating"] > p["rejected_rating"] for p in on_policy)
    assert {p["source"] for p in human} == {"hh_rlhf_harmless", "fine_grained_rlhf_qa"}
    assert all(p["split"] in ("train", "heldout") for p in pairs)
    assert set(pairs[0]) == set(PAIR_SCHEMA.names)

    dropped = {(d["prompt_row_id"], d["reason"]) for d in store.iter_rows("preference_pairs_quarantine")}
    reasons = {reason for _, reason in dropped}
    assert {"tie", "eval_overlap", "hh_speaker_marker_inside_turn"} <= reasons
    assert (prompts[1]["row_id"], "tie") in dropped and (prompts[0]["row_id"], "eval_overlap") in dropped

    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"chosen_differs_from_rejected": True, "same_prompt": True, "no_eval_overlap": True}
    require_pair_checks_passed(store, store.latest_version("preference_pairs"))

    paired = Ledger(store).query("SELECT row_id, related_ids FROM events WHERE event = 'paired'")
    assert sorted(e["row_id"] for e in paired) == sorted(p["prompt_row_id"] for p in pairs)
    assert {e["related_ids"][0] for e in paired} == {p["pair_id"] for p in pairs}

    # the same inputs and config give the same pair ids
    again = dg.materialize(preference_assets[-1:], resources=resources, run_config={"ops": {
        "preference_pairs": config["ops"]["preference_pairs"]}}, instance=dg.DagsterInstance.ephemeral())
    assert again.success
    assert [p["pair_id"] for p in store.iter_rows("preference_pairs")] == [p["pair_id"] for p in pairs]


class VerifiedFakeLauncher(ComputeLauncher):
    """Generation only (a judge launch fails the test): the SFT model answers prompt 0 right every time,
    prompt 1 right then wrong, and every other prompt wrong, against the prompt rows' GSM8K ground truth."""

    def run(self, context, module, extras, **hints):
        store = Store(extras["tulu_home"])
        LAUNCHED.append(module)
        if module != GENERATION_JOB:
            raise AssertionError(f"unexpected module {module}: verified prompts need no judge")
        params = SamplingParams.from_json(extras["params"])
        truth = {r["row_id"]: r["ground_truth"] for r in store.iter_rows("preference_prompts")}
        out = []
        for i, request in enumerate(_requests(store, extras["requests"])):
            answer = float(truth[request["request_id"]])
            completions = []
            for j in range(params.n):
                right = i == 0 or (i == 1 and j == 0)
                text = f"Let me think step by step. The answer is {answer if right else answer + 7:g}."
                completions.append(Completion(text, extras["backend"]["model_id"], "stop", 10, 8, params.seed + i,
                                              params.to_json(), j).to_json())
            out.append({"request_id": request["request_id"], "completions": completions})
        store.write_jsonl(extras["output"], out)


def test_cpu_defaults_pair_gsm8k_prompts_by_their_verifier_without_a_judge(tiny_home):
    store, pool, _ = tiny_home
    LAUNCHED.clear()
    resources = {"storage": TuluStorage(root=store.url), "launcher": VerifiedFakeLauncher(),
                 "generation": GenerationResource(), "judge": JudgeResource()}
    config = {"ops": {"preference_prompts": {"config": {"size": 4}},
                      "preference_pairs": {"config": {"eval_suites": ["dev"], "eval_benchmarks": ["gsm8k"]}}}}
    result = dg.materialize(preference_assets, resources=resources, run_config=config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert LAUNCHED == [GENERATION_JOB]  # the SFT model only: no base model, no judge process

    prompts = list(store.iter_rows("preference_prompts"))
    assert len(prompts) == 4 and {p["source"] for p in prompts} == {"gsm8k_train"}
    completions = list(store.iter_rows("policy_completions"))
    assert {c["model_role"] for c in completions} == {"sft", "reference"}
    assert store.dataset_info("judged_completions").rows == 0
    judge_run = result.asset_materializations_for_node("judged_completions")[0].metadata["judge_run"].value
    assert "every prompt has a verifier" in judge_run["skipped"]

    pairs = {p["prompt_row_id"]: p for p in store.iter_rows("preference_pairs")}
    assert set(pairs) == {p["row_id"] for p in prompts[1:]}  # prompt 0: every SFT sample is right
    for row_id, pair in pairs.items():
        assert pair["origin"] == "on_policy" and pair["judge_id"] == "verifier:gsm8k"
        assert (pair["chosen_model"], pair["rejected_model"]) == ("dataset_reference", "sft-fake")
        assert (pair["chosen_rating"], pair["rejected_rating"]) == (1.0, 0.0)
        truth = float(next(p["ground_truth"] for p in prompts if p["row_id"] == row_id))
        assert f"The answer is {truth + 7:g}." in pair["rejected"]  # the wrong sample, never the right one
        assert json.loads(pair["ratings"])["rank_by"] == "verified"
    dropped = [(d["prompt_row_id"], d["reason"]) for d in store.iter_rows("preference_pairs_quarantine")]
    assert dropped == [(prompts[0]["row_id"], "all_correct")]

    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"chosen_differs_from_rejected": True, "same_prompt": True, "no_eval_overlap": True}
    not_paired = Ledger(store).query("SELECT row_id, reason FROM events WHERE event = 'not_paired'")
    assert [(e["row_id"], e["reason"]) for e in not_paired] == dropped
