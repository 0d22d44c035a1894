import os
from pathlib import Path

import pytest

# keep the tests' own thread use predictable on small machines
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A prepared data folder: the seeded synthetic corpus with a small byte-level BPE."""
    from pretrainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare("builtin:synthetic", "bpe:300", out, progress=False)
    return out


@pytest.fixture(scope="session")
def span_data(tmp_path_factory) -> Path:
    """A prepared data folder with 20 T5 sentinels (a small Unigram tokenizer)."""
    from pretrainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "span"
    prepare("builtin:synthetic", "unigram:400", out, progress=False, sentinels=20)
    return out


def tiny_llama(fast: bool = True):
    """A seeded 2-layer Llama-style model (grouped-query attention, SwiGLU, RoPE) and one batch;
    with the fast paths (as the trainer runs a float32 CPU model) unless ``fast=False``."""
    import torch

    from pretrainer import build_model
    from pretrainer.model.fast import apply_fast_paths

    torch.manual_seed(0)
    model = build_model("llama-tiny", n_layer=2, d_model=64, n_head=4, n_kv_heads=2, d_ff=96,
                        vocab_size=101, max_seq_len=32)
    return apply_fast_paths(model) if fast else model, torch.randint(0, 101, (3, 24))


def objective(name: str, model, **run):
    """The registered objective ``name`` for ``model`` (a RunConfig with the model's config)."""
    from pretrainer.config import RunConfig
    from pretrainer.train.objectives import OBJECTIVES

    return OBJECTIVES[name](RunConfig(model=model.cfg, objective=name, **run))


def step_grads(model, x, forward=None):
    """The training loss of ``x`` (the clm objective, targets = inputs, as the trainer computes it)
    and the gradients of every parameter; ``forward``: a wrapped model (compiled) to run instead."""
    import torch

    loss = objective("clm", model).loss(forward or model, {"input_ids": x, "labels": x})
    return loss, torch.autograd.grad(loss, list(model.parameters()))
