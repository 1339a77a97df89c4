"""The preference-data stage (Tülu 3 DPO data): prompts sampled from the decontaminated pool, completions
from a pool of models (the on-policy SFT checkpoint among them), 1–5 ratings by a judge on four
UltraFeedback aspects, and chosen/rejected pairs, plus the bundled human preference data in the same schema.

Modules: `schema` (datasets and ids), `prompts`, `completions`, `rubric`, `judge` (+ `judge_job`, its
process entrypoint), `pairs` (on-policy pairs, held-out split, checks) and `human` (HH-RLHF, FineGrainedRLHF).
"""
