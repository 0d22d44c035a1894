"""Local (banded causal) attention, alternating with global layers as in GPT-3 and GPT-Neo
(``model.attention_layers``, ``model.attention_window``): what a local layer can see, and cached
generation with it."""

import pytest
import torch

from pretrainer.config import ModelConfig
from pretrainer.errors import ConfigError
from pretrainer.model import build_model
from pretrainer.model.fast import apply_fast_paths
from pretrainer.model.layers import SelfAttention

W = 4


def local_layer(**kw) -> SelfAttention:
    cfg = ModelConfig(d_model=32, n_head=4, attention_layers="local", attention_window=W, vocab_size=50, **kw)
    cfg.validate()
    torch.manual_seed(0)
    return SelfAttention(cfg, 0, causal=True).eval()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_a_token_more_than_the_window_back_never_changes_a_local_layer(kv_heads):
    layer = local_layer(n_kv_heads=kv_heads)
    x = torch.randn(1, 12, 32)
    base = layer(x)
    for t in range(12):  # change position t: outputs at t .. t+W-1 may change, none other
        changed = x.clone()
        changed[0, t] += 1.0
        diff = (layer(changed) - base).abs().amax(-1)[0]
        assert (diff[:t] == 0).all() and (diff[t + W:] == 0).all(), (t, diff)
        assert (diff[t:t + W] > 0).all(), (t, diff)


def test_the_window_equals_a_hand_built_band_mask():
    layer = local_layer()
    x = torch.randn(2, 10, 32)
    q, k = torch.arange(10)[:, None], torch.arange(10)[None, :]
    band = (k <= q) & (q - k < W)
    layer.window = None  # the plain layer given the band as its mask
    expected = layer(x, attn_mask=band)
    layer.window = W
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("fast", [False, True])
def test_cached_generation_equals_recomputation_with_alternating_layers(fast):
    torch.manual_seed(0)
    model = build_model("llama-tiny", n_layer=4, d_model=32, n_head=4, n_kv_heads=2, d_ff=64, vocab_size=60,
                        max_seq_len=64, attention_layers="global,local", attention_window=5).eval()
    if fast:
        apply_fast_paths(model)
    assert [b.attn.window for b in model.blocks] == [None, 5, None, 5]
    x = torch.randint(0, 60, (2, 7))
    a = model.generate(x, 20, use_cache=True)
    b = model.generate(x, 20, use_cache=False)
    assert torch.equal(a, b)
    full = model(a).logits  # and the cached logits equal the full forward's
    cache = model.new_cache(2)
    step = torch.cat([model(a[:, :7], cache=cache).logits] +
                     [model(a[:, i:i + 1], cache=cache).logits for i in range(7, a.shape[1])], dim=1)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_local_layers_are_configured_with_a_window_on_decoders():
    with pytest.raises(ConfigError, match="attention_window, a positive number"):
        build_model("gpt-nano", vocab_size=50, attention_layers="global,local")
    with pytest.raises(ConfigError, match="attention_layers='glboal'.*did you mean 'global'"):
        build_model("gpt-nano", vocab_size=50, attention_layers="glboal")
    with pytest.raises(ConfigError, match="arch=decoder only"):
        build_model("bert-tiny", attention_layers="local", attention_window=8)


# ----------------------------------------------------------------------------------------------
# The cache of a local layer keeps its window only (a ring buffer)

WINDOW = 6


def alternating(preset: str, max_seq_len: int = 128):
    torch.manual_seed(0)
    kw = dict(n_kv_heads=2, d_ff=64) if preset == "llama-tiny" else {}
    return build_model(preset, n_layer=4, d_model=32, n_head=4, vocab_size=60, max_seq_len=max_seq_len,
                       attention_layers="global,local", attention_window=WINDOW, **kw).eval()


def chunked_logits(model, ids, chunks, cache=None):
    """Logits of ``ids`` fed through one cache in pieces of the given lengths."""
    cache = cache or model.new_cache(ids.shape[0])
    out, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, at:at + n], cache=cache).logits)
            at += n
    assert at == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-tiny"])
def test_a_local_layers_cache_holds_its_window_and_generation_is_unchanged(preset):
    model = alternating(preset)
    cache = model.new_cache(2)
    sizes = [tuple(k.shape) for k in cache.k] + [tuple(v.shape) for v in cache.v]
    kv = model.cfg.kv_heads
    assert sizes == 2 * [(2, kv, 128, 8), (2, kv, WINDOW, 8), (2, kv, 128, 8), (2, kv, WINDOW, 8)]
    x = torch.randint(0, 60, (2, 9))
    a = model.generate(x, 40, use_cache=True)  # 49 positions: the rings wrap eight times
    b = model.generate(x, 40, use_cache=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        full = model(a).logits
    step = chunked_logits(model, a, [9] + [1] * 40)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 30, [4, 3, 7, 1, 1, 2, 9, 3], [WINDOW - 1, WINDOW, WINDOW + 1, 1, 17]],
                         ids=["one-by-one", "mixed", "around-the-window"])
def test_chunks_after_cached_positions_equal_one_forward(chunks):
    model = alternating("llama-tiny")
    ids = torch.randint(0, 60, (3, sum(chunks)))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(chunked_logits(model, ids, chunks), full, rtol=1e-4, atol=1e-5)


def test_reordering_a_cache_with_rings_follows_the_rows():
    """What beam search does: keep some rows (repeated, reordered) and go on from there."""
    model = alternating("gpt-nano")
    ids = torch.randint(0, 60, (3, 20))
    cache = model.new_cache(3)
    chunked_logits(model, ids[:, :13], [10, 1, 1, 1], cache)  # the rings have wrapped
    rows = torch.tensor([2, 0, 0])
    cache.reorder(rows)
    with torch.no_grad():
        expected = model(ids[rows]).logits[:, 13:]
    got = chunked_logits(model, ids[rows, 13:], [1, 3, 1, 2], cache)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_window_as_long_as_the_cache_needs_no_ring():
    model = alternating("gpt-nano", max_seq_len=WINDOW)
    cache = model.new_cache(1)
    assert cache.windows == [None] * 4 and all(k.shape[2] == WINDOW for k in cache.k)
    ids = torch.randint(0, 60, (1, WINDOW))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(chunked_logits(model, ids, [2, 1, 3]), full, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The fast path: local layers computed block by block


@pytest.mark.parametrize("T, kv_heads", [(40, None), (37, 2), (9, None)], ids=["blocks", "ragged-gqa", "short"])
def test_banded_attention_equals_the_masked_plain_layer(T, kv_heads):
    plain = local_layer(n_kv_heads=kv_heads).train()  # training: values and gradients
    fast = apply_fast_paths(local_layer(n_kv_heads=kv_heads).train())
    x = torch.randn(2, T, 32, requires_grad=True)
    y = plain(x)
    dx, *dw = torch.autograd.grad(y.square().sum(), [x, *plain.parameters()])
    y_fast = fast(x)
    dx_fast, *dw_fast = torch.autograd.grad(y_fast.square().sum(), [x, *fast.parameters()])
    torch.testing.assert_close(y_fast, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_fast, dx, rtol=1e-4, atol=1e-5)
    for a, b in zip(dw_fast, dw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_banded_attention_is_used_only_where_it_applies(monkeypatch):
    import pretrainer.model.fast as fast_module

    calls = []
    real = fast_module.banded_attention
    monkeypatch.setattr(fast_module, "banded_attention", lambda *a: calls.append(a[0].shape[-2]) or real(*a))
    model = apply_fast_paths(alternating("gpt-nano"))
    ids = torch.randint(0, 60, (1, 5 * WINDOW))
    with torch.no_grad():
        model(ids)  # two local layers, 30 positions > 2 windows
        model(ids[:, :2 * WINDOW])  # too short to gain: the plain masked path
        model.generate(ids, 3)  # cached: the plain path (the ring)
    assert calls == [5 * WINDOW, 5 * WINDOW]


def test_info_counts_a_local_layers_window_not_the_whole_context():
    """Each of gpt-neo-125m's 6 local layers attends to 256 keys, not 2,048: 12 d (T - W) FLOPs per
    token fewer per local layer in the hardware count (6 d (T - W) in Kaplan's)."""
    import dataclasses

    from pretrainer.config import model_preset
    from pretrainer.model.info import model_info

    neo = model_preset("gpt-neo-125m")
    dense = model_info(dataclasses.replace(neo, attention_layers="global"))
    local = model_info(neo)
    assert dense["flops_per_token"] - local["flops_per_token"] == 12 * 768 * 6 * (2048 - 256)
    assert dense["flops_per_token_kaplan"] - local["flops_per_token_kaplan"] == 6 * 768 * 6 * (2048 - 256)
    assert local["params"] == dense["params"]
