"""Preference-data library: pair selection, ties, seeds, ids, split, rubric parsing, judges (fake backends),
human preference ingestion on bundled rows, and prompt selection on a small store."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from test_sft_support import bundled_rows

from tulu_pipeline.curation.pipeline import BlockedByChecksError, record_check_results
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.generation.base import Completion, SamplingParams
from tulu_pipeline.preference.human import FG_PREDICTIONS, HumanPairProblem, fg_net_wins, fg_pair, hh_pair, human_pair
from tulu_pipeline.preference.judge import (
    ChatJudge, JudgeItem, LoglikelihoodJudge, judge_identity, rating_distribution, run_judging
)
from tulu_pipeline.preference.pairs import NoPair, select_pair, split_of
from tulu_pipeline.preference.prompts import PromptSelectionConfig, select_preference_prompts
from tulu_pipeline.preference.rubric import ASPECTS, UnparseableJudgment, aspect_messages, parse_ratings, rubric_hash
from tulu_pipeline.preference.schema import PROMPTS_DATASET, pair_id, prompt_messages
from tulu_pipeline.preference.verified import select_verified, verification_of, verify_completion
from tulu_pipeline.provenance.ledger import Ledger
from tulu_pipeline.settings import data_dir


def completion(cid: str, mean: float, text: str | None = None) -> dict:
    return {"completion_id": cid, "text": text if text is not None else f"answer {cid}", "mean_rating": mean}


# ---------------------------------------------------------------------------------------------
# pair selection
# ---------------------------------------------------------------------------------------------
def test_chosen_is_best_and_rejected_strictly_lower():
    group = [completion("a", 4.0), completion("b", 2.5), completion("c", 3.0), completion("d", 4.0, "answer a")]
    chosen, rejected = select_pair("p1", group, seed=0)
    assert chosen["mean_rating"] == 4.0
    assert rejected["mean_rating"] < chosen["mean_rating"]
    assert rejected["text"] != chosen["text"]


def test_selection_is_seeded_and_order_independent():
    group = [completion(str(i), float(i % 5 + 1)) for i in range(12)]
    first = select_pair("p1", group, seed=7)
    assert select_pair("p1", list(reversed(group)), seed=7) == first
    rejected_ids = {select_pair("p1", group, seed=s)[1]["completion_id"] for s in range(20)}
    assert len(rejected_ids) > 1  # the seed picks among the lower-rated completions
    assert all(next(c for c in group if c["completion_id"] == r)["mean_rating"] < 5.0 for r in rejected_ids)


def test_ties_and_too_few_completions_give_no_pair():
    with pytest.raises(NoPair) as tie:
        select_pair("p1", [completion("a", 3.0), completion("b", 3.0), completion("c", 3.0)], seed=0)
    assert tie.value.code == "tie"
    # a lower-rated completion with the chosen text is no pair either
    with pytest.raises(NoPair) as same_text:
        select_pair("p1", [completion("a", 4.0, "same"), completion("b", 1.0, " same ")], seed=0)
    assert same_text.value.code == "tie"
    with pytest.raises(NoPair) as few:
        select_pair("p1", [completion("a", 4.0), completion("b", 1.0, "   ")], seed=0)
    assert few.value.code == "too_few_completions"


def test_pair_ids_are_content_addresses():
    a = pair_id("row-1", "good", "bad", "local:m:v1:h")
    assert a == pair_id("row-1", "good", "bad", "local:m:v1:h") and a.startswith("pair-")
    assert len({a, pair_id("row-1", "bad", "good", "local:m:v1:h"), pair_id("row-2", "good", "bad", "local:m:v1:h"),
                pair_id("row-1", "good", "bad", "openai:m:v1:h")}) == 4


def test_heldout_split_is_seeded_by_prompt():
    ids = [f"src-{i:05d}" for i in range(2000)]
    splits = [split_of(i, 0.2, seed=0) for i in ids]
    assert splits == [split_of(i, 0.2, seed=0) for i in ids]
    assert 0.16 < splits.count("heldout") / len(ids) < 0.24
    assert splits != [split_of(i, 0.2, seed=1) for i in ids]
    assert all(split_of(i, 0.0, seed=0) == "train" for i in ids[:50])


def test_prompt_is_cut_after_the_last_user_turn():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    prompt, reference = prompt_messages(messages)
    assert [m["content"] for m in prompt] == ["s", "q1", "a1", "q2"] and reference == "a2"
    assert prompt_messages([{"role": "user", "content": "q"}]) == ([{"role": "user", "content": "q"}], None)
    assert prompt_messages([{"role": "assistant", "content": "a"}]) is None


# ---------------------------------------------------------------------------------------------
# rubric and judges
# ---------------------------------------------------------------------------------------------
def test_parse_ratings_formats_and_errors():
    lines = "helpfulness: Rating: 4\nhonesty: Rating: 5\ninstruction_following: Rating: 3\ntruthfulness: Rating: 2"
    assert parse_ratings(lines) == {"helpfulness": 4, "honesty": 5, "instruction_following": 3, "truthfulness": 2}
    assert parse_ratings("Helpfulness: 4\nHonesty: 5\nInstruction following: 3\nTruthfulness: 2")["instruction_following"] == 3
    fenced = '```json\n{"helpfulness": 1, "honesty": 2, "instruction_following": {"rating": 3}, "truthfulness": 5}\n```'
    assert parse_ratings(fenced)["truthfulness"] == 5
    with pytest.raises(UnparseableJudgment, match="no rating for truthfulness"):
        parse_ratings("helpfulness: 4\nhonesty: 5\ninstruction_following: 3")
    with pytest.raises(UnparseableJudgment, match="not an integer from 1 to 5"):
        parse_ratings(lines.replace("Rating: 2", "Rating: 7"))
    with pytest.raises(UnparseableJudgment, match="conflicting"):
        parse_ratings(lines + "\nhonesty: 1")
    with pytest.raises(UnparseableJudgment, match="invalid JSON"):
        parse_ratings("{not json")


def test_rubric_identity_is_versioned():
    judge_id = judge_identity("local", "models/base_model")
    assert judge_id.endswith(rubric_hash()) and ":ultrafeedback-v1:" in judge_id
    with pytest.raises(ValueError):
        judge_identity("remote", "m")
    text = aspect_messages("honesty", [{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.")[1]["content"]
    assert "Why is the sky blue?" in text and "Rayleigh scattering." in text and "5:" in text


class FakeScorer:
    """Log-likelihood of a rating continuation: highest at the rating written as [r=K] in the response."""

    def __init__(self):
        self.requests = []

    def loglikelihood(self, requests):
        self.requests.extend(requests)
        out = []
        for messages, continuation in requests:
            text = messages[-1]["content"]
            target = int(text.split("[r=")[1][0]) if "[r=" in text else 3
            out.append((-2.0 * abs(int(continuation) - target), 1))
        return out


def test_loglikelihood_judge_takes_the_argmax_and_keeps_the_expected_rating():
    scorer = FakeScorer()
    judge = LoglikelihoodJudge(scorer, "local:fake:v:h")
    items = [JudgeItem("c1", [{"role": "user", "content": "q"}], "[r=5] great"),
             JudgeItem("c2", [{"role": "user", "content": "q"}], "plain")]
    j1, j2 = judge.judge(items)
    assert {r["rating"] for r in j1.ratings.values()} == {5} and j1.mean_rating == 5.0
    assert j2.mean_rating == 3.0 and math.isclose(j2.ratings["honesty"]["expected"], 3.0, abs_tol=1e-6)
    assert 4.0 < j1.ratings["helpfulness"]["expected"] < 5.0
    assert len(scorer.requests) == 2 * len(ASPECTS) * 5
    assert [c for _, c in scorer.requests[:5]] == ["1", "2", "3", "4", "5"]
    assert rating_distribution([0.0] * 5)[0] == 1  # a flat distribution resolves to the lower rating


class ScriptedChat:
    """A chat backend answering from a script per call; records the params of every call."""

    model_id = "fake-judge"

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def generate(self, prompts, params):
        self.calls.append(params)
        answer = self.answers.pop(0)
        return [[Completion(answer, self.model_id, "stop", 1, 1, params.seed + i, params.to_json())]
                for i, _ in enumerate(prompts)]


GOOD = "helpfulness: Rating: 4\nhonesty: Rating: 4\ninstruction_following: Rating: 5\ntruthfulness: Rating: 3"


def test_chat_judge_retries_with_another_seed_then_quarantines():
    item = JudgeItem("c1", [{"role": "user", "content": "q"}], "r")
    backend = ScriptedChat(["I think it is good.", GOOD])
    (judgment,) = ChatJudge(backend, "openai:fake", SamplingParams(max_new_tokens=32, temperature=0.0, seed=5),
                            max_retries=2).judge([item])
    assert judgment.mean_rating == 4.0 and judgment.attempts == 2 and judgment.raw[0] == "I think it is good."
    assert backend.calls[0].seed != backend.calls[1].seed and backend.calls[1].temperature > 0

    backend = ScriptedChat(["nope", "Rating: 9", "still nothing"])
    (bad,) = ChatJudge(backend, "openai:fake", max_retries=2).judge([item])
    assert bad.ratings is None and bad.mean_rating is None and bad.attempts == 3
    assert bad.raw == ["nope", "Rating: 9", "still nothing"] and "unparseable after 3 attempts" in bad.reason
    assert len({p.seed for p in backend.calls}) == 3


def test_run_judging_writes_one_judgment_per_request(store):
    store.write_jsonl("work/req.jsonl", [{"completion_id": f"c{i}", "prompt": [{"role": "user", "content": "q"}],
                                          "response": f"[r={i + 2}] x"} for i in range(3)])
    counts = run_judging(store, "work/req.jsonl", "work/out.jsonl", LoglikelihoodJudge(FakeScorer(), "j"), batch_size=2)
    assert counts == {"judged": 3, "quarantined": 0}
    lines = [json.loads(line) for line in store.read_bytes("work/out.jsonl").decode().splitlines()]
    assert [(x["completion_id"], x["mean_rating"], x["judge_id"]) for x in lines] == [("c0", 2.0, "j"), ("c1", 3.0, "j"),
                                                                                      ("c2", 4.0, "j")]


# ---------------------------------------------------------------------------------------------
# human preference data
# ---------------------------------------------------------------------------------------------
def _hh_raw(index: int) -> dict:
    with gzip.open(data_dir() / "train/hh_rlhf/harmless-base/test.jsonl.gz", "rt", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i == index:
                return json.loads(line)
    raise IndexError(index)


def test_hh_rows_become_pairs_with_their_final_replies():
    (row,) = bundled_rows("hh_rlhf_harmless", 1)
    pair = hh_pair(row)
    raw = _hh_raw(0)
    assert raw["chosen"].rstrip().endswith(pair["chosen"]) and raw["rejected"].rstrip().endswith(pair["rejected"])
    assert pair["prompt"] == row["messages"] and pair["prompt"][-1]["role"] == "user"
    assert pair["origin"] == "human" and pair["license"] == "MIT" and pair["prompt_row_id"] == row["row_id"]
    assert (pair["chosen_rating"], pair["rejected_rating"]) == (1.0, 0.0)


@pytest.mark.parametrize("line", [667, 796, 1172, 1254])
def test_mis_split_hh_transcripts_are_quarantined(line):
    (row,) = bundled_rows("hh_rlhf_harmless", 1, skip=line)
    assert "  Human:" in _hh_raw(line)["chosen"]  # a turn without its blank line: the loader cannot split it
    with pytest.raises(HumanPairProblem) as problem:
        human_pair(row, seed=0)
    assert problem.value.code == "hh_speaker_marker_inside_turn"


def test_finegrained_pairs_follow_the_pairwise_judgments():
    assert fg_net_wins([1, 1, 1, 2, 2, 0]) == [3, -3, 0, 0]  # 1 beats all; 3 and 4 beat 2; 3 ties 4
    assert fg_net_wins([0] * 6) == [0, 0, 0, 0]
    with pytest.raises(HumanPairProblem):
        fg_net_wins([1, 2, 3])
    rows = bundled_rows("fine_grained_rlhf_qa", 20)
    made, ties = 0, 0
    for row in rows:
        extra = json.loads(row["extra"])
        try:
            pair = fg_pair(row, seed=0)
        except HumanPairProblem as exc:
            assert exc.code in ("tie", "identical_responses")
            ties += 1
            continue
        made += 1
        info = json.loads(pair["extra"])
        c, r = FG_PREDICTIONS.index(info["chosen_field"]), FG_PREDICTIONS.index(info["rejected_field"])
        assert pair["chosen"] == extra[FG_PREDICTIONS[c]] and pair["rejected"] == extra[FG_PREDICTIONS[r]]
        assert pair["chosen_rating"] > pair["rejected_rating"]
        assert pair["prompt"] == [row["messages"][0]] and pair == fg_pair(row, seed=0)
    assert made >= 10
    tie = dict(rows[0], extra=json.dumps({**json.loads(rows[0]["extra"]), "preference": [0] * 6}))
    with pytest.raises(HumanPairProblem, match="tie"):
        fg_pair(tie, seed=0)


# ---------------------------------------------------------------------------------------------
# prompt selection
# ---------------------------------------------------------------------------------------------
def small_pool(store, passed: bool = True) -> list[dict]:
    rows = (bundled_rows("gsm8k_train", 10) + bundled_rows("code_alpaca", 6) + bundled_rows("hh_rlhf_harmless", 4)
            + bundled_rows("fine_grained_rlhf_qa", 3))
    store.write_rows("decontaminated_prompts", "d1", rows, ROW_SCHEMA)
    record_check_results(store, "d1", {"no_eval_overlap": passed, "schema_valid": True, "unique_row_ids": True})
    store.write_rows("sft_mix", "m1", rows[:4], ROW_SCHEMA)
    return rows


def test_prompts_are_sampled_disjoint_from_the_sft_mix(store):
    rows = small_pool(store)
    config = PromptSelectionConfig(size=8, seed=3)
    result = select_preference_prompts(store, config, "run-1")
    selected = list(store.iter_rows(PROMPTS_DATASET, result.version))
    ids = {r["row_id"] for r in selected}
    assert len(selected) == 8 and not ids & {r["row_id"] for r in rows[:4]}
    assert {r["source"] for r in selected} == {"gsm8k_train", "code_alpaca"}  # human sources left to the pairs
    assert result.per_source == {"gsm8k_train": 4, "code_alpaca": 4}  # round-robin over sources
    assert all(r["messages"][-1]["role"] == "user" and r["reference_response"] for r in selected)
    again = select_preference_prompts(store, config, "run-2")
    assert again.version == result.version and {r["row_id"] for r in store.iter_rows(PROMPTS_DATASET)} == ids
    events = Ledger(store).query("SELECT row_id, event FROM events WHERE event = 'selected_for_preference'")
    assert {e["row_id"] for e in events} == ids
    other = select_preference_prompts(store, PromptSelectionConfig(size=8, seed=4), "run-3")
    assert other.version != result.version
    with pytest.raises(ValueError, match="not in decontaminated_prompts"):
        select_preference_prompts(store, PromptSelectionConfig(sources=["math_train"]), "run-4")


def test_prompts_refuse_a_pool_whose_checks_failed(store):
    small_pool(store, passed=False)
    with pytest.raises(BlockedByChecksError):
        select_preference_prompts(store, PromptSelectionConfig(), "run-1")


class FakeNextTokenScorer(FakeScorer):
    """A FakeScorer that also offers one-pass next-token scoring, which the judge must prefer."""

    def __init__(self):
        super().__init__()
        self.contexts = []

    def next_token_logprobs(self, contexts, candidates):
        self.contexts.extend(contexts)
        return [[score for score, _ in FakeScorer.loglikelihood(self, [(c, k) for k in candidates])] for c in contexts]


def test_judge_prefers_one_pass_next_token_scoring_with_the_same_result():
    items = [JudgeItem("c1", [{"role": "user", "content": "q"}], "[r=4] fine"),
             JudgeItem("c2", [{"role": "user", "content": "q"}], "[r=1] bad")]
    fast, slow = FakeNextTokenScorer(), FakeScorer()
    assert LoglikelihoodJudge(fast, "j").judge(items) == LoglikelihoodJudge(slow, "j").judge(items)
    assert len(fast.contexts) == 2 * len(ASPECTS) and len(slow.requests) == 2 * len(ASPECTS) * 5


def test_rank_by_expected_separates_equal_argmax_ratings():
    group = [dict(completion("a", 1.0), mean_expected=1.8), dict(completion("b", 1.0), mean_expected=1.6),
             dict(completion("c", 1.0), mean_expected=1.7)]
    with pytest.raises(NoPair, match="tie"):
        select_pair("p1", group, seed=0)
    chosen, rejected = select_pair("p1", group, seed=0, score="mean_expected")
    assert chosen["completion_id"] == "a" and rejected["completion_id"] in ("b", "c")
    with pytest.raises(ValueError, match="no mean_expected"):
        select_pair("p1", [completion("a", 2.0), completion("b", 1.0)], seed=0, score="mean_expected")


def test_next_token_scorer_matches_loglikelihood_on_a_tiny_model(tmp_path):
    from test_sft_support import save_tiny_model

    from tulu_pipeline.generation.transformers_backend import TransformersBackend
    from tulu_pipeline.preference.judge_job import make_judge
    from tulu_pipeline.preference.scoring import NextTokenScorer, judge_scorer

    backend = TransformersBackend(save_tiny_model(tmp_path / "tiny"), "tiny", device="cpu", batch_size=3)
    contexts = [aspect_messages(a, [{"role": "user", "content": q}], r) for a in ("honesty", "truthfulness")
                for q, r in (("What is 2+2?", "4"), ("Name a colour, in a long sentence of several words.", "blue"))]
    scorer = judge_scorer(backend)
    assert isinstance(scorer, NextTokenScorer)
    fast = scorer.next_token_logprobs(contexts, ["1", "2", "3", "4", "5"])
    slow = backend.loglikelihood([(c, k) for c in contexts for k in "12345"])
    assert max(abs(fast[i][j] - slow[5 * i + j][0]) for i in range(len(contexts)) for j in range(5)) < 1e-4
    judge = make_judge(backend, {"kind": "local", "judge_id": "local:tiny"})
    (judgment,) = judge.judge([JudgeItem("c1", [{"role": "user", "content": "What is 2+2?"}], "4")])
    assert set(judgment.ratings) == set(ASPECTS) and judgment.mean_expected is not None
    with pytest.raises(ValueError, match="single|needs one"):
        scorer.next_token_logprobs(contexts[:1], ["12345 and more"])


def test_rank_by_auto_uses_expected_ratings_only_where_every_completion_has_one():
    from tulu_pipeline.preference.pairs import resolve_rank_by

    with_expected = [dict(completion("a", 1.0), mean_expected=1.8), dict(completion("b", 1.0), mean_expected=1.6)]
    assert resolve_rank_by("auto", with_expected) == "expected"
    assert resolve_rank_by("auto", with_expected + [dict(completion("c", 2.0), mean_expected=None)]) == "rating"
    assert resolve_rank_by("rating", with_expected) == "rating"


def test_model_pool_orders_roles_and_rejects_duplicates_or_empty():
    from tulu_pipeline.preference.completions import model_pool

    pool = model_pool(("sft-1", {"kind": "transformers"}), ("base", {"kind": "transformers"}),
                      [("remote", {"kind": "openai"})], include_reference=True)
    assert [(m.model_id, m.role, m.backend["kind"]) for m in pool] == [
        ("sft-1", "sft", "transformers"), ("base", "base", "transformers"), ("remote", "extra", "openai")]
    with pytest.raises(ValueError, match="distinct"):
        model_pool(("same", {}), ("same", {}), [], include_reference=True)
    with pytest.raises(ValueError, match="empty"):
        model_pool(None, None, [], include_reference=False)
    assert model_pool(None, None, [], include_reference=True) == []


def test_generate_pool_reuses_complete_outputs_and_generates_the_rest(store):
    from tulu_pipeline.preference.completions import PoolModel, generate_pool, output_path

    done, todo = PoolModel("done", "base", {}), PoolModel("todo", "sft", {})
    rows = [{"request_id": p, "completions": [{"text": "x"}]} for p in ("p1", "p2")]
    store.write_bytes(output_path("v1", done), "".join(json.dumps(r) + "\n" for r in rows).encode())
    calls, logged = [], []
    outputs, runs = generate_pool(store, "v1", [done, todo], ["p1", "p2"], 1,
                                  generate=lambda model, rel: calls.append((model.model_id, rel)) or {"ok": 1},
                                  log=logged.append)
    assert calls == [("todo", output_path("v1", todo))]
    assert runs == {"done": {"reused": output_path("v1", done)}, "todo": {"ok": 1}}
    assert outputs == {"done": (done, output_path("v1", done)), "todo": (todo, output_path("v1", todo))}
    assert len(logged) == 2


# ---------------------------------------------------------------------------------------------
# verified pairs
# ---------------------------------------------------------------------------------------------
def _verified_completion(cid: str, role: str, text: str) -> dict:
    return {"completion_id": cid, "model_role": role, "text": text}


def test_verified_selection_prefers_the_reference_and_a_wrong_policy_sample():
    completions = [_verified_completion("ref", "reference", "ref"), _verified_completion("s1", "sft", "s1"),
                   _verified_completion("s2", "sft", "s2"), _verified_completion("s3", "sft", "s3"),
                   _verified_completion("b1", "base", "b1")]
    verdicts = {"ref": True, "s1": True, "s2": False, "s3": False, "b1": False}
    chosen, rejected = select_verified("p", completions, verdicts, seed=0)
    assert chosen["completion_id"] == "ref" and rejected["completion_id"] in {"s2", "s3"}  # never the base model
    picks = {select_verified("p", completions, verdicts, seed)[1]["completion_id"] for seed in range(16)}
    assert picks == {"s2", "s3"}  # the seed decides among the wrong samples
    assert select_verified("p", completions[::-1], verdicts, seed=0)[1] == rejected  # not the row order
    # the reference fails: a verified sample of any model is chosen
    chosen, _ = select_verified("p", completions, {**verdicts, "ref": False}, seed=0)
    assert chosen["completion_id"] == "s1"


@pytest.mark.parametrize("verdicts, roles, code", [
    ({"ref": True, "s1": True}, ("reference", "sft"), "all_correct"),
    ({"ref": False, "s1": False}, ("reference", "sft"), "none_correct"),
    ({"ref": True, "s1": False}, ("reference", "base"), "no_policy_sample"),
])
def test_verified_selection_says_why_a_prompt_gives_no_pair(verdicts, roles, code):
    completions = [_verified_completion(cid, role, cid) for cid, role in zip(verdicts, roles)]
    with pytest.raises(NoPair, match=code) as raised:
        select_verified("p", completions, verdicts, seed=0)
    assert raised.value.code == code


def test_verification_of_reads_gsm8k_truth_and_ifeval_constraints():
    row = bundled_rows("gsm8k_train", 1)[0]
    found = verification_of(row)
    assert found["task"] == "gsm8k" and found["ground_truth"] == row["ground_truth"]
    right = f"So the answer is {row['ground_truth']}."
    assert verify_completion(found, right) and not verify_completion(found, "So the answer is 123456789.")
    constraints = {"instruction_id_list": ["length_constraints:number_words"],
                   "kwargs": [{"relation": "less than", "num_words": 5}]}
    found = verification_of({"source": "self_instruct_seed", "constraints": json.dumps(constraints)})
    assert found == {"task": "ifeval", "constraints": constraints}
    assert verify_completion(found, "Short.") and not verify_completion(found, "This answer has far too many words.")
    assert verification_of(bundled_rows("code_alpaca", 1)[0]) is None
