"""The parallel block (GPT-J, GPT-NeoX, PaLM: ``model.parallel_block``, ``parallel_norms``), partial
rotary (``model.rope_fraction``, GPT-NeoX / Pythia) and the PaLM presets. Logit parity with
``GPTNeoXForCausalLM`` is in tests/test_hf_parity.py, the fast paths in tests/test_fast_paths.py,
causality and cached generation in tests/test_model.py (families ``palm`` and ``neox``)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrainer.config import ModelConfig, model_preset
from pretrainer.errors import ConfigError
from pretrainer.model import build_model
from pretrainer.model.info import model_info
from pretrainer.model.layers import Block, Rotary, apply_rotary

CFG = ModelConfig(n_layer=1, n_head=4, d_model=32, vocab_size=50, max_seq_len=16, position="rope")


def _block(**kw) -> Block:
    cfg = dataclasses.replace(CFG, **kw)
    cfg.validate()
    torch.manual_seed(0)
    block = Block(cfg, 0, causal=True).eval()
    with torch.no_grad():  # norms with non-trivial gains and biases
        for p in block.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape))
    return block


@pytest.mark.parametrize("norms", [1, 2])
def test_parallel_block_adds_both_branches_of_the_block_input(norms):
    block = _block(parallel_block=True, parallel_norms=norms)
    rotary = Rotary(CFG.head_dim, 16, 10000.0)
    x = torch.randn(2, 10, 32)
    n1 = F.layer_norm(x, (32,), block.norm1.weight, block.norm1.bias, CFG.norm_eps)
    n2 = n1 if norms == 1 else F.layer_norm(x, (32,), block.norm2.weight, block.norm2.bias, CFG.norm_eps)
    expected = x + block.attn(n1, rotary) + block.mlp(n2)
    torch.testing.assert_close(block(x, rotary), expected)
    assert (block.norm2 is None) == (norms == 1)
    # and it is not the serial block: there the MLP reads x + attn(norm1(x))
    serial = x + block.attn(n1, rotary)
    if norms == 2:
        serial = serial + block.mlp(F.layer_norm(serial, (32,), block.norm2.weight, block.norm2.bias,
                                                 CFG.norm_eps))
        assert (block(x, rotary) - serial).abs().max() > 1e-3


def test_one_shared_norm_has_one_norm_fewer_per_layer():
    two = build_model("llama-tiny", n_layer=3, vocab_size=50, norm="layernorm", parallel_block=True)
    one = build_model("llama-tiny", n_layer=3, vocab_size=50, norm="layernorm", parallel_block=True,
                      parallel_norms=1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(two) - count(one) == 3 * 256  # one LayerNorm gain per layer (llama-tiny: no biases)
    assert not any(k.endswith("norm2.weight") for k in one.state_dict())


def test_partial_rotary_turns_the_first_dims_and_passes_the_rest():
    # one rotated pair (R = 2, frequency theta**0 = 1): position p turns (a, b) by p radians
    rot = Rotary(2, 8, 10000.0)
    x = torch.tensor([3.0, 4.0, 5.0, 6.0]).expand(1, 1, 8, 4)  # [B, H, T, D], the same at every position
    y = apply_rotary(x, *rot.tables(0, 8, torch.float32))
    p = torch.arange(8.0)
    torch.testing.assert_close(y[0, 0, :, 0], 3 * torch.cos(p) - 4 * torch.sin(p))
    torch.testing.assert_close(y[0, 0, :, 1], 4 * torch.cos(p) + 3 * torch.sin(p))
    assert torch.equal(y[..., 2:], x[..., 2:])


def test_partial_rotary_scores_depend_on_the_offset_only():
    rot = Rotary(8, 32, 10000.0)  # 8 of 16 dims rotated
    cos, sin = rot.tables(0, 32, torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    q_all = apply_rotary(q.expand(1, 1, 32, 16), cos, sin)[0, 0]
    k_all = apply_rotary(k.expand(1, 1, 32, 16), cos, sin)[0, 0]
    torch.testing.assert_close(q_all[9] @ k_all[4], q_all[25] @ k_all[20])
    assert abs(float(q_all[9] @ k_all[4] - q_all[9] @ k_all[5])) > 1e-4


def test_rope_fraction_sets_the_rotary_tables():
    model = build_model("llama-tiny", n_layer=1, vocab_size=50, rope_fraction=0.25)  # head_dim 64
    assert model.cfg.rotary_dim == 16 and model.rotary.cos.shape == (256, 16)


def test_parallel_encoder_is_bidirectional():
    torch.manual_seed(0)
    model = build_model("bert-tiny", n_layer=2, vocab_size=50, max_seq_len=16, prenorm=True,
                        parallel_block=True).eval()
    x = torch.randint(5, 50, (1, 12))
    y = x.clone()
    y[0, 10] = 4
    with torch.no_grad():
        assert (model(x).logits[0, :10] - model(y).logits[0, :10]).abs().max() > 1e-4


@pytest.mark.parametrize("overrides, named", [
    (dict(parallel_block=True, prenorm=False), "parallel_block=true needs prenorm=true"),
    (dict(parallel_norms=3), "parallel_norms=3"),
    (dict(parallel_norms=1), "parallel_norms=1 applies to parallel_block=true only"),
    (dict(arch="encoder-decoder", parallel_block=True, position="relative"), "not encoder-decoder"),
    (dict(rope_fraction=0.0), "rope_fraction=0.0"),
    (dict(rope_fraction=1.5), "rope_fraction=1.5"),
    (dict(rope_fraction=0.5, position="learned"), "applies to position=rope only"),
    (dict(rope_fraction=0.1), "rotates 0 of 8 dims"),
    (dict(rope_fraction=0.375), "rotates 3 of 8 dims"),
])
def test_bad_parallel_and_rotary_options_are_one_line_errors(overrides, named):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(CFG, **overrides).validate()
    assert named in str(err.value) and "\n" not in str(err.value)


def test_palm_8b_parameter_count():
    """PaLM 8B (Chowdhery et al. 2022, Table 1): 32 layers, d_model 4096, 16 heads of 256, multi-query
    attention (one key/value head), SwiGLU with d_ff = 4 d_model, a 256k vocabulary shared by input
    and output, no biases, one (bias-free) LayerNorm per parallel layer plus a final one. The count
    is PaLM's reported 8.63B: the paper counts the shared embedding once, as we do."""
    L, d, H, Dh, V = 32, 4096, 16, 256, 256_000
    ff = 4 * d
    attention = d * H * Dh + 2 * d * Dh + H * Dh * d  # queries, one key and one value head, output
    mlp = 3 * d * ff  # gate, up, down
    expected = V * d + L * (attention + mlp + d) + d
    assert expected == 8_632_012_800 and round(expected / 1e9, 2) == 8.63
    info = model_info(model_preset("palm-8b"))
    assert info["params"] == expected
    assert info["params_non_embedding"] == expected - V * d


def test_palm_tiny_is_palm_shaped_and_trains_a_step():
    cfg = model_preset("palm-tiny")
    assert (cfg.parallel_block, cfg.parallel_norms, cfg.kv_heads, cfg.mlp, cfg.bias, cfg.tie_embeddings) == \
        (True, 1, 1, "swiglu", False, True)
    torch.manual_seed(0)
    model = build_model("palm-tiny", vocab_size=64, n_layer=2)
    x = torch.randint(0, 64, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
