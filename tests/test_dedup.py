"""Deduplication: keep-first order, exact and MinHash near duplicates, and the real training pool."""

from __future__ import annotations

import random
import time

import pytest

from tulu_pipeline.curation.dedup import DedupConfig, Deduplicator, dedup_order, dedup_text, shingles
from tulu_pipeline.curation.normalize import NormalizeConfig, Normalizer
from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.provenance.ledger import MemorySink

TRAIN_SOURCES = ("gsm8k_train", "math_train", "code_alpaca", "self_instruct_seed", "hh_rlhf_harmless", "fine_grained_rlhf_qa")
# Same order as the curation default (tulu_pipeline.curation.config): verifiable sources first.
PRIORITY = ["gsm8k_train", "math_train", "code_alpaca", "self_instruct_seed", "fine_grained_rlhf_qa", "hh_rlhf_harmless"]

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu amber birch cedar dune ember fjord glacier harbor "
         "island jungle knoll lagoon meadow nebula orchard prairie quarry ravine summit tundra upland valley willow "
         "yarrow zephyr anchor beacon canyon delta2 estuary forest grove heath iris").split()
assert len(WORDS) == 60 and len(set(WORDS)) == 60


def make_row(source: str, row_id: str, user: str, assistant: str = "An answer.", system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"row_id": row_id, "source": source, "source_key": f"{source}.jsonl:1", "license": "MIT", "messages": messages}


def run(rows, **config):
    cfg = DedupConfig(**config)
    sink = MemorySink()
    step = Deduplicator(cfg, sink)
    kept = list(step(dedup_order(rows, cfg.source_priority)))
    return kept, step, sink


# ---------------------------------------------------------------------------------------------
# text, order, shingles
# ---------------------------------------------------------------------------------------------
def test_dedup_text_prompt_and_all():
    row = make_row("s", "s-1", "What  is\n2+2?", "It is\tFour.", system="Be BRIEF.")
    assert dedup_text(row, "prompt") == "be brief. what is 2+2?"
    assert dedup_text(row, "all") == "be brief. what is 2+2? it is four."
    with pytest.raises(ValueError):
        dedup_text(row, "answers")


def test_dedup_order_by_priority_then_source_then_row_id():
    rows = [make_row(source, row_id, "x") for source, row_id in
            [("zeta", "zeta-1"), ("beta", "beta-2"), ("alpha", "alpha-9"), ("gamma", "gamma-1"), ("beta", "beta-1"),
             ("alpha", "alpha-1")]]
    ordered = dedup_order(rows, ["gamma", "beta"])
    assert [r["row_id"] for r in ordered] == ["gamma-1", "beta-1", "beta-2", "alpha-1", "alpha-9", "zeta-1"]
    assert [r["row_id"] for r in dedup_order(rows, [])] == ["alpha-1", "alpha-9", "beta-1", "beta-2", "gamma-1", "zeta-1"]


def test_short_texts_are_one_shingle():
    assert shingles("a b c", 5) == {b"a b c"}
    assert shingles("a b c d e f", 5) == {b"a b c d e", b"b c d e f"}


def test_config_rejects_unusable_settings():
    with pytest.raises(ValueError, match="not usable for LSH"):
        DedupConfig(threshold=1.0)
    assert DedupConfig(threshold=1.0, near_duplicates=False).threshold == 1.0
    with pytest.raises(ValueError):
        DedupConfig(shingle=3)  # unknown fields are errors, not silently ignored


# ---------------------------------------------------------------------------------------------
# exact duplicates
# ---------------------------------------------------------------------------------------------
def test_exact_duplicate_across_sources_keeps_higher_priority_source():
    rows = [make_row("alpha_src", "alpha_src-1", "Name three  primary colors."),
            make_row("beta_src", "beta_src-1", "name three primary colors.", assistant="Another answer.")]
    kept, step, sink = run(rows, source_priority=["beta_src"])
    assert [r["row_id"] for r in kept] == ["beta_src-1"]
    assert sink.events == [
        {"row_id": "beta_src-1", "event": "kept", "decision": "unique", "reason": None, "related_ids": [], "details": None},
        {"row_id": "alpha_src-1", "event": "dropped_duplicate", "decision": "exact",
         "reason": "exact duplicate of beta_src-1", "related_ids": ["beta_src-1"], "details": None},
    ]
    assert step.dropped == [{"row_id": "alpha_src-1", "source": "alpha_src", "duplicate_of": "beta_src-1",
                             "kind": "exact", "jaccard": None}]
    # without a priority, source names decide
    kept, _, _ = run(rows)
    assert [r["row_id"] for r in kept] == ["alpha_src-1"]


def test_exact_duplicate_within_source_keeps_smaller_row_id():
    rows = [make_row("s", "s-b", "Same prompt here."), make_row("s", "s-c", "Same prompt here."),
            make_row("s", "s-a", "Same prompt here.")]
    kept, step, sink = run(rows)
    assert [r["row_id"] for r in kept] == ["s-a"]
    assert [(d["row_id"], d["duplicate_of"], d["kind"]) for d in step.dropped] == [("s-b", "s-a", "exact"),
                                                                                    ("s-c", "s-a", "exact")]
    assert step.stats == {"rows_in": 3, "kept": 1, "exact_duplicates": 2, "near_duplicates": 0,
                          "per_source": {"s": {"in": 3, "kept": 1, "exact": 2, "near": 0}}}


def test_key_all_compares_answers_too():
    rows = [make_row("s", "s-1", "Tell me a joke.", "Joke one."), make_row("s", "s-2", "Tell me a joke.", "Joke two.")]
    assert len(run(rows, key="prompt")[0]) == 1
    assert len(run(rows, key="all")[0]) == 2


# ---------------------------------------------------------------------------------------------
# near duplicates
# ---------------------------------------------------------------------------------------------
def test_near_duplicate_with_one_word_changed_is_dropped():
    original = " ".join(WORDS)
    edited = " ".join(WORDS[:30] + ["lighthouse"] + WORDS[31:])
    different = " ".join(reversed(WORDS))
    rows = [make_row("s", "s-1", original), make_row("s", "s-2", edited), make_row("s", "s-3", different)]
    kept, step, sink = run(rows)
    assert [r["row_id"] for r in kept] == ["s-1", "s-3"]
    [drop] = step.dropped
    assert drop["row_id"] == "s-2" and drop["duplicate_of"] == "s-1" and drop["kind"] == "near"
    assert drop["jaccard"] >= 0.8
    event = sink.events[1]
    assert event["event"] == "dropped_duplicate" and event["decision"] == "near"
    assert event["related_ids"] == ["s-1"] and event["details"] == {"jaccard": drop["jaccard"]}
    assert event["reason"].startswith("near duplicate of s-1")
    assert step.stats["near_duplicates"] == 1 and step.stats["exact_duplicates"] == 0


def test_near_copies_with_different_answers_are_distinct_tasks():
    original = " ".join(WORDS)
    edited = " ".join(WORDS[:30] + ["lighthouse"] + WORDS[31:])
    other_edit = " ".join(WORDS[:45] + ["windmill"] + WORDS[46:])
    first, second, third = make_row("s", "s-1", original), make_row("s", "s-2", edited), make_row("s", "s-3", other_edit)
    first["ground_truth"], second["ground_truth"], third["ground_truth"] = "60", "30", "60"
    kept, step, _ = run([first, second, third])
    assert [r["row_id"] for r in kept] == ["s-1", "s-2"]  # s-3 repeats s-1's answer; s-2 is another task
    assert (step.dropped[0]["row_id"], step.dropped[0]["duplicate_of"], step.dropped[0]["kind"]) == ("s-3", "s-1", "near")
    kept, _, _ = run([first, second], distinct_answers_are_distinct=False)
    assert [r["row_id"] for r in kept] == ["s-1"]


def test_near_duplicates_off_keeps_near_copies():
    edited = " ".join(WORDS[:30] + ["lighthouse"] + WORDS[31:])
    rows = [make_row("s", "s-1", " ".join(WORDS)), make_row("s", "s-2", edited)]
    kept, step, _ = run(rows, near_duplicates=False)
    assert len(kept) == 2 and step.stats["near_duplicates"] == 0


def test_threshold_is_respected():
    # Half the words changed: an estimated Jaccard near 0.3, a duplicate only under a low threshold.
    rows = [make_row("s", "s-1", " ".join(WORDS)), make_row("s", "s-2", " ".join(WORDS[:30] + [w + "x" for w in WORDS[30:]]))]
    kept, _, _ = run(rows)
    assert len(kept) == 2
    kept, step, _ = run(rows, threshold=0.2)
    assert len(kept) == 1 and 0.2 <= step.dropped[0]["jaccard"] < 0.5


def test_near_duplicate_names_most_similar_kept_row():
    base = WORDS[:50]
    rows = [make_row("s", "s-1", " ".join(base[:38] + [w + "q" for w in base[38:]])),  # last 12 words changed
            make_row("s", "s-2", " ".join(base)),  # kept: about 0.59 from s-1, under the 0.6 threshold
            make_row("s", "s-3", " ".join(base[:44] + [w + "q" for w in base[44:]]))]  # above 0.6 with both
    kept, step, _ = run(rows, threshold=0.6)
    assert [r["row_id"] for r in kept] == ["s-1", "s-2"]
    [drop] = step.dropped
    assert drop["duplicate_of"] == "s-2" and drop["jaccard"] == 0.75  # s-1 scores 0.66: the closer row wins


# ---------------------------------------------------------------------------------------------
# order and determinism
# ---------------------------------------------------------------------------------------------
def test_unordered_input_raises():
    rows = [make_row("s", "s-2", "Two."), make_row("s", "s-1", "One.")]
    step = Deduplicator(DedupConfig(), MemorySink())
    with pytest.raises(ValueError, match="not in dedup_order"):
        list(step(rows))
    # the priority counts: name order is not dedup order when a later name has priority
    rows = [make_row("a", "a-1", "One."), make_row("b", "b-1", "Two.")]
    with pytest.raises(ValueError, match="not in dedup_order"):
        list(Deduplicator(DedupConfig(source_priority=["b"]), MemorySink())(rows))
    with pytest.raises(ValueError, match="repeats row"):
        list(Deduplicator(DedupConfig(), MemorySink())([rows[0], rows[0]]))


@pytest.fixture(scope="module")
def normalized_pool(bundle) -> list[dict]:
    rows = [row for source in TRAIN_SOURCES for row in iter_source_rows(get_source(source), root=bundle)]
    return list(Normalizer(NormalizeConfig(), MemorySink())(rows))


def test_deterministic_whatever_the_arrival_order(normalized_pool):
    edited = " ".join(WORDS[:30] + ["lighthouse"] + WORDS[31:])
    sample = [r for r in normalized_pool if r["source"] in ("hh_rlhf_harmless", "gsm8k_train")][:3000] + [
        make_row("gsm8k_train", "gsm8k_train-zz", " ".join(WORDS)), make_row("hh_rlhf_harmless", "hh-00", edited),
        make_row("hh_rlhf_harmless", "hh-01", "Call me a bad name")]
    results = []
    for seed in range(3):
        shuffled = sample[:]
        random.Random(seed).shuffle(shuffled)
        kept, step, sink = run(shuffled, source_priority=PRIORITY)
        results.append(([r["row_id"] for r in kept], sink.events, step.dropped, step.stats))
    assert results[0] == results[1] == results[2]
    kept_ids, events, dropped, stats = results[0]
    assert ("hh-00", "gsm8k_train-zz") in {(d["row_id"], d["duplicate_of"]) for d in dropped}  # priority beats row id
    assert len(events) == len(sample) and len({e["row_id"] for e in events}) == len(sample)


# ---------------------------------------------------------------------------------------------
# the real training pool
# ---------------------------------------------------------------------------------------------
# Measured on the bundled data (normalized first, key "prompt", defaults, PRIORITY): (in, kept, exact, near).
# Every duplicate found is within its own source; no prompt occurs in two training sources. MATH's
# templated problems that differ in one symbol ("... the letters of the word MADAM") are near-identical
# texts; with different reference answers they are kept as distinct tasks (29 of them), and the one
# left is "RADII" vs "PROOF", whose answers happen to agree (60).
EXPECTED = {
    "gsm8k_train": (7473, 7472, 0, 1),
    "math_train": (7500, 7498, 1, 1),
    "code_alpaca": (2015, 2015, 0, 0),
    "self_instruct_seed": (175, 175, 0, 0),
    "fine_grained_rlhf_qa": (500, 500, 0, 0),
    "hh_rlhf_harmless": (2312, 2295, 2, 15),
}


def test_real_training_pool(normalized_pool):
    start = time.perf_counter()
    kept, step, sink = run(normalized_pool, source_priority=PRIORITY)
    elapsed = time.perf_counter() - start
    print(f"\ndedup of {len(normalized_pool)} rows: {elapsed:.2f}s; "
          + ", ".join(f"{s}: exact {c['exact']}, near {c['near']}" for s, c in step.stats["per_source"].items()))
    per_source = {s: (c["in"], c["kept"], c["exact"], c["near"]) for s, c in step.stats["per_source"].items()}
    assert per_source == EXPECTED
    assert step.stats["rows_in"] == len(normalized_pool) == 19975
    assert (step.stats["kept"], step.stats["exact_duplicates"], step.stats["near_duplicates"]) == (19955, 3, 17)

    kept_ids = {r["row_id"] for r in kept}
    assert len(sink.events) == len(normalized_pool)
    assert len({e["row_id"] for e in sink.events}) == len(normalized_pool)
    for drop in step.dropped:
        assert drop["duplicate_of"] in kept_ids
        assert drop["source"] == drop["duplicate_of"].rsplit("-", 1)[0]  # within-source duplicates only
        assert drop["kind"] == "exact" or drop["jaccard"] >= 0.8
    # the known cases: an HH prompt asked twice, and MATH's one repeated problem
    texts = {r["row_id"]: dedup_text(r, "prompt") for r in normalized_pool}
    exact = sorted(texts[d["row_id"]] for d in step.dropped if d["kind"] == "exact")
    assert exact == ["call me a bad name", "real numbers $x$ and $y$ satisfy the equation $x^2 + y^2 = 10x - 6y - 34$. "
                     "what is $x+y$?", "what are racist words"]
