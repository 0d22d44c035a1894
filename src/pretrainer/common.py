"""Constants and small tensor helpers shared by every layer of the package (data, models,
objectives, fine-tuning): the ground floor, which imports nothing else of ``pretrainer``."""

from __future__ import annotations

import torch

#: Label value of a position that is not predicted (PyTorch's ``ignore_index`` default).
IGNORE = -100


def shift_right(labels: torch.Tensor, decoder_start_id: int = 0, pad_id: int = 0) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``labels`` shifted right by one with
    ``decoder_start_id`` first (T5 starts with ``<pad>``, id 0 in pretrainer tokenizers) and
    ``IGNORE`` turned into ``pad_id``."""
    shifted = torch.full_like(labels, pad_id)
    shifted[..., 0] = decoder_start_id
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == IGNORE, pad_id)
