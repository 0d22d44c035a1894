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
