"""A small curation-and-mixing chain run as its own process, for the crash-safety tests (no tests here).

``python tests/reliability_driver.py TULU_HOME RUN_ID`` ingests three training pools and two benchmarks,
normalizes, deduplicates, decontaminates (recording the blocking checks) and publishes a mix: the same
library calls the Dagster assets make, in the same order.
"""

from __future__ import annotations

import sys

from tulu_pipeline.curation.config import CurationConfig, EvalSelection
from tulu_pipeline.curation.pipeline import (
    decontaminate_prompts, deduplicate_prompts, normalize_prompts, record_check_results,
    schema_violations, verify_no_eval_overlap,
)
from tulu_pipeline.curation.stages import build_eval_index
from tulu_pipeline.data.ingest import ingest_source
from tulu_pipeline.data.registry import get_source
from tulu_pipeline.mixing.config import MixConfig
from tulu_pipeline.mixing.publish import build_sft_mix
from tulu_pipeline.storage import Store

TRAIN = ["self_instruct_seed", "code_alpaca", "gsm8k_train"]
EVALS = ["gsm8k_test", "ifeval"]
CONFIG = CurationConfig(train_sources=TRAIN, evals=EvalSelection(benchmarks=["gsm8k", "ifeval"]))
MIX = MixConfig.model_validate({"name": "crash_test", "seed": 7, "heldout_rows": 6, "sources": {
    "gsm8k_train": {"rows": 20}, "code_alpaca": {"rows": 20}, "self_instruct_seed": {"rows": 20}}})


# Printed as `step NAME` when each step starts: the crash-safety test kills on these lines, not on a clock.
STEPS = [f"ingest:{source_id}" for source_id in TRAIN + EVALS] + [
    "normalize", "deduplicate", "decontaminate", "checks", "mix"]


def step(name: str) -> None:
    print(f"step {name}", flush=True)


def run(home: str, run_id: str) -> None:
    store = Store(home)
    for source_id in TRAIN + EVALS:
        step(f"ingest:{source_id}")
        ingest_source(get_source(source_id), store, run_id)
    step("normalize")
    normalize_prompts(store, CONFIG, run_id)
    step("deduplicate")
    deduplicate_prompts(store, CONFIG, run_id)
    step("decontaminate")
    index = build_eval_index(store, CONFIG)
    result = decontaminate_prompts(store, CONFIG, run_id, index=index)
    step("checks")
    violations = verify_no_eval_overlap(store, result.version, index[0], CONFIG)
    problems, duplicates = schema_violations(store, "decontaminated_prompts", result.version)
    record_check_results(store, result.version, {"no_eval_overlap": not violations, "schema_valid": not problems,
                                                 "unique_row_ids": duplicates == 0})
    step("mix")
    build_sft_mix(store, MIX, run_id)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
