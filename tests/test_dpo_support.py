"""Shared helpers for the DPO tests (no tests here): preference pairs built from bundled rows.

Pairs are what the on-policy pipeline produces in miniature: the prompt of a bundled row, its reference
answer as ``chosen`` and a sample of the model being trained as ``rejected`` (Tülu 3's on-policy pairs put a
stronger answer against the policy's own). Samples are drawn with a fixed seed, so pairs are deterministic.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from test_sft_support import bundled_rows, save_tiny_model


def pair_schema():
    """The preference-pair schema the preference stage publishes (the DPO stage's input contract)."""
    from tulu_pipeline.preference.schema import PAIR_SCHEMA

    return PAIR_SCHEMA


def model_samples(model_dir: Path, prompts: list[list[dict[str, str]]], max_new_tokens: int = 24,
                  seed: int = 0) -> list[str]:
    """One sampled answer per prompt from the model in ``model_dir`` (Tülu template, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tulu_pipeline.templates.chat_template import apply_tulu_chat_template

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


# A tiny run: 16 train pairs, 4 per step, 2 epochs = 8 optimizer steps. lr 1e-3 because the tiny random model
# needs large steps (the cpu_demo preset's 5e-5 is for the 135M SFT checkpoint).
TINY_DPO = {
    "learning_rate": 1e-3, "num_epochs": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
    "max_length": 192, "warmup_ratio": 0.1, "save_steps": 3, "logging_steps": 1, "bf16": False, "seed": 7,
    "eval_batch_size": 8,
}
N_TRAIN, N_HELDOUT = 16, 12


@functools.lru_cache(maxsize=1)
def tiny_setup() -> tuple[Path, tuple[dict[str, Any], ...]]:
    """A tiny random Llama saved once per test session, and pairs whose rejected answers are its samples."""
    root = Path(tempfile.mkdtemp(prefix="tulu-test-dpo-"))
    atexit.register(shutil.rmtree, root, True)
    model = save_tiny_model(root / "sft_model")
    return model, tuple(make_pairs(model, N_TRAIN, N_HELDOUT))


def split_pairs(pairs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [p for p in pairs if p["split"] == "train"], [p for p in pairs if p["split"] == "heldout"]


SFT_ID = "sft-tiny"


def tiny_home(tmp_path: Path) -> Any:
    """A TULU_HOME with ``preference_pairs@pairs-v1`` and a tiny "SFT checkpoint" ``models/sft-tiny``."""
    from tulu_pipeline.storage import Store
    from tulu_pipeline.layout import MANIFEST_FILE
    from tulu_pipeline.training.checkpointing import write_json_atomic
    from tulu_pipeline.preference.schema import PAIRS_DATASET

    model_dir, pairs = tiny_setup()
    store = Store(str(tmp_path / "tulu_home"))
    store.write_rows(PAIRS_DATASET, "pairs-v1", list(pairs), pair_schema())
    target = Path(store.path("models", SFT_ID))
    target.mkdir(parents=True)
    for path in model_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    write_json_atomic(target / MANIFEST_FILE, {"fingerprint": "f" * 64, "base_model_sha256": "b" * 64})
    return store
