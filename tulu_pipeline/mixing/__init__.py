"""The SFT mix: which training sources, how many rows of each, and which rows exactly.

A mix is a YAML file (`config.MixConfig`): a name, a seed, a number of held-out rows and, per
training source, either an exact row count (``{rows: N}``) or a fraction of what is available
(``{fraction: F}``). Named presets ship in ``presets/`` (``cpu_demo``, ``tulu3_style``);
`load_mix_config` takes a preset name or a path.

Sampling (`sample.sample_mix`) is a pure function of the config and the set of available row ids:
no input order, process, machine or Python version changes which rows are chosen. The caller (the
``sft_mix`` asset) first keeps only rows that can be trained on (`sample.sft_eligible`), counts what
is available per source, samples, records the mix hash (`sample.mix_hash`) and writes one
``included_in_mix`` ledger event per chosen row (`sample.record_mix_events`).
"""

from tulu_pipeline.mixing.config import (
    PRESETS_DIR, MixConfig, MixConfigError, SourceQuota, load_mix_config, preset_names, train_source_ids,
)
from tulu_pipeline.mixing.sample import (
    MixError, MixSample, eligible_ids_by_source, fraction_count, mix_hash, record_mix_events, resolve_counts,
    row_ids_hash, sample_mix, sft_eligible, split_heldout,
)

__all__ = [
    "PRESETS_DIR", "MixConfig", "MixConfigError", "MixError", "MixSample", "SourceQuota", "eligible_ids_by_source",
    "fraction_count", "load_mix_config", "mix_hash", "preset_names", "record_mix_events", "resolve_counts",
    "row_ids_hash", "sample_mix", "sft_eligible", "split_heldout", "train_source_ids",
]
