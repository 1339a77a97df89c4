"""Micro-batches for SFT: padded, or packed padding-free rows whose sequences never attend to each other.

Packed (`SFTCollator(packing=True)`): the micro-batch's sequences are laid end to end in rows of at most
``max_row_tokens`` tokens (first-fit decreasing; ``None`` puts them all in one row). Each sequence's
``position_ids`` restart at 0 and no ``attention_mask`` is passed: transformers (>= 4.56, `masking_utils`)
then derives the sequence boundaries from the position ids and builds a block-diagonal causal mask for the
sdpa and eager attention kernels, and the flash-attention kernels use them as varlen boundaries. The label
at each sequence start is -100, so no token learns to predict the next sequence's first token. Rows are
right-padded to the longest row; padding gets its own position ids (a separate block) and -100 labels.

Why rows, not TRL's single flattened row: with sdpa/eager (CPU, GPUs without flash-attn) the mask is
dense, so attention costs (tokens in the row)^2; capping rows at ``max_length`` bounds that. Flash-attention
kernels read boundaries from position ids only for a single row (transformers' ``_is_packed_sequence``
requires batch size 1), so with them use ``max_row_tokens=None``.

Padded (``packing=False``): one row per sequence, right-padded to the longest, with an attention mask.

Every batch also carries bookkeeping that the trainer pops before the forward pass (`INFO_KEYS`):
``real_tokens`` and ``computed_tokens`` (packing efficiency = real tokens / token positions computed) and,
when examples have an ``example_index``, the indices of the examples in the micro-batch (which rows were
actually trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tulu_pipeline.templates.chat_template import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

INFO_KEYS = ("real_tokens", "computed_tokens", "example_index")


def pack_rows(lengths: Sequence[int], max_row_tokens: int | None) -> list[list[int]]:
    """Indices of sequences per row, first-fit decreasing; a sequence longer than the cap gets its own row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if max_row_tokens is None:
        return [order] if order else []
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_row_tokens - lengths[index])
    return rows


@dataclass
class SFTCollator:
    """Collate ``{"input_ids", "labels"}`` examples into a packed or padded micro-batch (see module doc)."""

    pad_token_id: int
    packing: bool = True
    max_row_tokens: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty micro-batch")
        ids = [list(example["input_ids"]) for example in examples]
        labels = [list(example["labels"]) for example in examples]
        if any(len(i) != len(lab) for i, lab in zip(ids, labels)):
            raise ValueError("input_ids and labels differ in length")
        batch = self._packed(ids, labels) if self.packing else self._padded(ids, labels)
        if "example_index" in examples[0]:
            import torch

            batch["example_index"] = torch.tensor([int(example["example_index"]) for example in examples])
        return batch

    def _padded(self, ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(i) for i in ids)
        batch_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(ids, labels)):
            batch_ids[row, : len(seq)] = torch.tensor(seq)
            batch_labels[row, : len(seq)] = torch.tensor(lab)
            mask[row, : len(seq)] = 1
        real = sum(len(i) for i in ids)
        return {
            "input_ids": batch_ids,
            "attention_mask": mask,
            "labels": batch_labels,
            "real_tokens": torch.tensor(real),
            "computed_tokens": torch.tensor(batch_ids.numel()),
        }

    def _packed(self, ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        import torch

        rows = pack_rows([len(i) for i in ids], self.max_row_tokens)
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        batch_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                seq, lab = ids[index], labels[index]
                end = start + len(seq)
                batch_ids[r, start:end] = torch.tensor(seq)
                batch_labels[r, start:end] = torch.tensor(lab)
                batch_labels[r, start] = IGNORE_INDEX  # a sequence's first token is never a target
                positions[r, start:end] = torch.arange(len(seq))
                start = end
            if start < width:  # padding: a block of its own, never attended to by real tokens (it comes last)
                positions[r, start:] = torch.arange(width - start)
        real = sum(len(i) for i in ids)
        return {
            "input_ids": batch_ids,
            "position_ids": positions,
            "labels": batch_labels,
            "real_tokens": torch.tensor(real),
            "computed_tokens": torch.tensor(batch_ids.numel()),
        }
