"""Shared helpers for the DPO tests (no tests here): preference pairs built from bundled rows.

Pairs are what the on-policy pipeline produces in miniature: the prompt of a bundled row, its reference
answer as ``chosen`` and a sample of the model being trained as ``rejected`` (Tülu 3's on-policy pairs put a
stronger answer against the policy's own). Samples are drawn with a fixed seed, so pairs are deterministic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from test_sft_support import bundled_rows


def pair_schema():
    """The preference-pair schema (PAIR_SCHEMA's fields; tulu_pipeline.preference.schema once it lands)."""
    try:
        from tulu_pipeline.preference.schema import PAIR_SCHEMA  # type: ignore[import-not-found]

        return PAIR_SCHEMA
    except ImportError:
        import pyarrow as pa

        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        return pa.schema([
            ("pair_id", pa.string()), ("prompt_row_id", pa.string()), ("source", pa.string()),
            ("license", pa.string()), ("prompt", pa.list_(message)), ("chosen", pa.string()),
            ("rejected", pa.string()), ("chosen_model", pa.string()), ("rejected_model", pa.string()),
            ("chosen_rating", pa.float64()), ("rejected_rating", pa.float64()), ("ratings", pa.string()),
            ("judge_id", pa.string()), ("origin", pa.string()), ("split", pa.string()), ("extra", pa.string()),
        ])


def model_samples(model_dir: Path, prompts: list[list[dict[str, str]]], max_new_tokens: int = 24,
                  seed: int = 0) -> list[str]:
    """One sampled answer per prompt from the model in ``model_dir`` (Tülu template, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tulu_pipeline.training.chat_template import apply_tulu_chat_template

    tokenizer = apply_tulu_chat_template(AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, do_sample=True, max_new_tokens=max_new_tokens, top_k=0, top_p=1.0,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        out.append(text or "ok")
    return out


def make_pairs(model_dir: Path, n_train: int, n_heldout: int, source: str = "gsm8k_train") -> list[dict[str, Any]]:
    """``n_train`` train and ``n_heldout`` heldout pairs: reference answer (chosen) vs model sample (rejected)."""
    rows = bundled_rows(source, n_train + n_heldout)
    prompts = [row["messages"][:-1] for row in rows]
    samples = model_samples(model_dir, prompts)
    pairs = []
    for i, (row, prompt, sample) in enumerate(zip(rows, prompts, samples)):
        pair_id = "pair-" + hashlib.sha256(f"{row['row_id']}|{sample}".encode()).hexdigest()[:16]
        pairs.append({
            "pair_id": pair_id, "prompt_row_id": row["row_id"], "source": row["source"], "license": row["license"],
            "prompt": prompt, "chosen": row["messages"][-1]["content"], "rejected": sample,
            "chosen_model": "reference", "rejected_model": "policy", "chosen_rating": 5.0, "rejected_rating": 1.0,
            "ratings": json.dumps({"reference": 5.0, "policy": 1.0}), "judge_id": "test", "origin": "on_policy",
            "split": "train" if i < n_train else "heldout", "extra": None,
        })
    return pairs
