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
    config = {"ops": {
        "preference_prompts": {"config": {"size": 6, "seed": 1}},
        "policy_completions": {"config": {"samples_per_model": 2, "max_new_tokens": 16}},
        "preference_pairs": {"config": {"eval_suites": ["dev"], "eval_benchmarks": ["gsm8k"],
                                        "human_rows_per_source": None}},
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
