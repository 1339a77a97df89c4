"""Shared helpers for the SFT tests (no tests here): the real SmolLM2 tokenizer and a tiny random Llama.

The tokenizer is read from the embedded GGUF once per session (a few seconds, no weight conversion);
the tiny model uses it with a 2-layer, 32-wide Llama, so training runs in seconds on a CPU.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> Path:
    from transformers import AutoTokenizer

    from tulu_pipeline.models.base_model import BaseModelError, locate_embedded_gguf

    try:
        gguf = locate_embedded_gguf()
    except BaseModelError as exc:  # a missing model package fails: a skip here would hide eleven modules
        pytest.fail(f"{exc} (or `make setup`)", pytrace=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target = Path(tempfile.mkdtemp(prefix="tulu-test-smollm2-tokenizer-"))
    atexit.register(shutil.rmtree, target, True)
    tokenizer.save_pretrained(target)
    return target


def smollm2_tokenizer() -> Any:
    """A fresh copy of SmolLM2-135M-Instruct's tokenizer (callers may change its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def save_tiny_model(target: Path, seed: int = 0, hidden_size: int = 32, heads: int = 4) -> Path:
    """A random 2-layer Llama (hidden 32, 4 heads unless given) with SmolLM2's tokenizer, saved like a base-model
    directory. vLLM's CPU attention needs a head size of 64 or more: ``hidden_size=128, heads=2``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * hidden_size, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def bundled_rows(source_id: str, count: int, skip: int = 0) -> list[dict[str, Any]]:
    """Rows of a bundled source, in file order."""
    from tulu_pipeline.data.loaders import iter_source_rows
    from tulu_pipeline.data.registry import get_source

    return list(itertools.islice(iter_source_rows(get_source(source_id)), skip, skip + count))
