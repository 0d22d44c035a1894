"""The fast paths (model/fast.py: hand-written backwards, fused CPU kernels, the fused head loss)
against the plain layers they replace: the same outputs, losses and gradients to float32 rounding,
on every family that uses them, and the same weights and state-dict names."""

import pytest
import torch

from conftest import objective
from pretrainer.model import build_model
from pretrainer.model.fast import FastMLP, FastRMSNorm, FastSelfAttention, apply_fast_paths, remove_fast_paths
from pretrainer.model.layers import MLP, RMSNorm, SelfAttention

SMALL = dict(n_layer=2, d_model=64, n_head=4, max_seq_len=64, vocab_size=101)
CASES = {
    "llama-tiny": dict(SMALL, n_kv_heads=2, d_ff=96),  # RMSNorm, rotary, SwiGLU, GQA
    "gpt2-small": dict(SMALL),  # LayerNorm, learned positions, GELU
    "gpt-neo-125m": dict(SMALL, attention_window=8),  # local layers, q/k/v without bias, unscaled
    "t5-tiny": dict(SMALL, d_ff=96),  # encoder-decoder, relative bias
    "bert-tiny": dict(SMALL),
    "palm-tiny": dict(SMALL, d_ff=96),  # parallel block, one shared norm, multi-query
    # GPT-NeoX: parallel block with a norm per branch, a quarter of each head rotated
    "neox": dict(SMALL, norm="layernorm", bias=True, mlp="gelu", parallel_block=True, rope_fraction=0.25),
}
LOSS = {"llama-tiny": "clm", "gpt2-small": "clm", "gpt-neo-125m": "clm", "t5-tiny": "span", "bert-tiny": "mlm", "palm-tiny": "clm",
        "neox": "clm"}
PRESET = {"neox": "llama-tiny"}  # cases that are not a preset's name: the preset they refine


def build(name: str):
    return build_model(PRESET.get(name, name), **CASES[name])


def batch_for(name: str, gen: torch.Generator) -> dict:
    x = torch.randint(7, 101, (3, 24), generator=gen)
    if name == "t5-tiny":
        return {"input_ids": x, "labels": torch.randint(7, 101, (3, 10), generator=gen)}
    if name == "bert-tiny":
        y = torch.full_like(x, -100)
        y[:, ::4] = x[:, ::4]
        return {"input_ids": x, "labels": y}
    y = x.roll(-1, 1)
    y[0, :5] = -100
    return {"input_ids": x, "labels": y}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_paths_equal_the_plain_layers(name):
    torch.manual_seed(0)
    plain = build(name).train()
    fast = apply_fast_paths(build(name).train())
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    batch = batch_for(name, torch.Generator().manual_seed(1))
    obj = objective(LOSS[name], plain)
    # the plain reference: full logits and PyTorch's cross-entropy, autograd everywhere
    with torch.no_grad():
        ref_eval = obj.loss(plain, batch)
    ref = obj.loss(plain, batch) if name == "bert-tiny" else _plain_loss(plain, obj, batch)
    g_ref = torch.autograd.grad(ref, list(plain.parameters()), allow_unused=True)  # BERT's pooler
    got = obj.loss(fast, batch)  # fast layers and, for the LM objectives, the fused head
    g = torch.autograd.grad(got, list(fast.parameters()), allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_eval, ref, rtol=1e-5, atol=1e-6)
    for (n, _), a, b in zip(plain.named_parameters(), g, g_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=n)
    with torch.no_grad():  # inference too (the rotary kernel serves generation)
        kw = {"decoder_input_ids": batch["labels"].clamp(min=0)} if name == "t5-tiny" else {}
        torch.testing.assert_close(fast(batch["input_ids"], **kw).logits,
                                   plain(batch["input_ids"], **kw).logits, rtol=1e-5, atol=1e-5)


def _plain_loss(model, obj, batch):
    """Mean cross-entropy from the plain logits (no fused head)."""
    from pretrainer.common import shift_right

    if model.cfg.arch == "encoder-decoder":
        logits = model(batch["input_ids"], decoder_input_ids=shift_right(batch["labels"])).logits
    else:
        logits = model(batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def test_apply_and_remove_swap_classes_in_place():
    model = build_model("llama-tiny", **CASES["llama-tiny"])
    params = [id(p) for p in model.parameters()]
    apply_fast_paths(model)
    kinds = {type(m) for m in model.modules()}
    assert {FastRMSNorm, FastSelfAttention, FastMLP} <= kinds and not {RMSNorm, SelfAttention, MLP} & kinds
    assert [id(p) for p in model.parameters()] == params and model.fast_paths
    remove_fast_paths(model)
    assert {RMSNorm, SelfAttention, MLP} <= {type(m) for m in model.modules()} and not model.fast_paths


def test_the_trainer_applies_fast_paths_for_float32_on_a_cpu_only():
    from pretrainer.model.fast import wants_fast_paths

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wants_fast_paths("auto", cpu, torch.float32)
    assert not wants_fast_paths("auto", cpu, torch.bfloat16)
    assert not wants_fast_paths("auto", cuda, torch.bfloat16)
    assert wants_fast_paths("true", cuda, torch.bfloat16) and not wants_fast_paths("false", cpu, torch.float32)


def test_activation_checkpointing_gives_the_same_step():
    """train.activation_checkpointing=full / selective recompute activations in the backward: the
    same loss and gradients as keeping them, the same state-dict names."""
    from pretrainer.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    ref_model = apply_fast_paths(build_model("llama-tiny", **CASES["llama-tiny"])).train()
    batch = batch_for("llama-tiny", torch.Generator().manual_seed(1))
    obj = objective("clm", ref_model)
    ref = obj.loss(ref_model, batch)
    g_ref = torch.autograd.grad(ref, list(ref_model.parameters()))
    for mode in ("full", "selective"):
        model = apply_fast_paths(build_model("llama-tiny", **CASES["llama-tiny"])).train()
        model.load_state_dict(ref_model.state_dict())
        apply_activation_checkpointing(model, mode)
        assert list(model.state_dict()) == list(ref_model.state_dict())
        loss = obj.loss(model, batch)
        g = torch.autograd.grad(loss, list(model.parameters()))
        torch.testing.assert_close(loss, ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("batch_bias", [False, True])
def test_biased_attention_equals_pytorchs(scale, batch_bias):
    """T5's learned position bias as plain products: the same output and gradients (queries,
    keys, values and the bias) as PyTorch's attention with the bias as its float mask, with
    masked entries at the dtype's lowest value as the position bias has them."""
    from pretrainer.model.fast import biased_attention

    torch.manual_seed(0)
    B, H, T, S, D = 2, 3, 5, 7, 8
    qkv = [torch.randn(B, n, H, D, dtype=torch.float64).transpose(1, 2).requires_grad_() for n in (T, S, S)]
    bias = torch.randn(B if batch_bias else 1, H, T, S, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias.shape) < 0.3, torch.finfo(torch.float64).min).requires_grad_()
    w = torch.randn(B, H, T, D, dtype=torch.float64)
    got = biased_attention(*qkv, bias, scale)
    ref = torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=bias, scale=scale)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad((got * w).sum(), [*qkv, bias]),
                    torch.autograd.grad((ref * w).sum(), [*qkv, bias])):
        torch.testing.assert_close(a, b)
