"""Shared helpers for the GRPO/RLVR tests (no tests here): a character-level toy tokenizer, a tiny Llama over it
that is briefly SFT-warmed on single-digit addition, and RLVR rows for that task.

The toy vocabulary (digits, ``+=``, the characters of Tülu's chat-template headers, EOS) keeps the model's output
layer ~40 wide, so sampling and training steps take milliseconds on a CPU and RL's effect shows in seconds.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
PAD = "<pad>"
ADDITION_CHARS = sorted(set(string.digits + "+=-\n<>|" + "systemuserassistant" + " "))


def char_tokenizer() -> Any:
    """A fast character-level tokenizer with EOS and pad tokens (no BOS), saved like any HF tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, "[UNK]": 2}
    for char in ADDITION_CHARS:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token="[UNK]")


def addition_row(a: int, b: int, split: str = "train") -> dict[str, Any]:
    """An RLVR row asking ``a+b=`` with the sum as ground truth (task ``gsm8k``: the answer is a number)."""
    return {"row_id": f"add-{a}-{b}", "source": "toy_addition", "source_key": f"toy:{a}+{b}", "license": "mit",
            "messages": [{"role": "user", "content": f"{a}+{b}="}], "ground_truth": str(a + b),
            "constraints": None, "eval_id": None, "extra": json.dumps({"task": "gsm8k", "split": split})}


def save_warm_addition_model(target: Path, pairs: list[tuple[int, int]], correct_share: float = 0.3,
                             steps: int = 120, seed: int = 0, hidden_size: int = 64, heads: int = 4) -> Path:
    """A tiny Llama over `char_tokenizer`, SFT-warmed on ``pairs`` whose answers are right ``correct_share`` of the
    time and a random 0..18 otherwise: it has learned the answer format (a number, then EOS) but not the sums."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tulu_pipeline.templates.chat_template import (
        apply_tulu_chat_template,
        encode_conversation,
    )

    tokenizer = apply_tulu_chat_template(char_tokenizer())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * hidden_size, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    examples = []
    for _ in range(8):
        for a, b in pairs:
            answer = a + b if rng.random() < correct_share else rng.randrange(19)
            examples.append(encode_conversation([{"role": "user", "content": f"{a}+{b}="},
                                                 {"role": "assistant", "content": str(answer)}], tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, min(16, len(examples)))
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
