"""The decoder-only model: published sizes, causality, KV cache, generation, initialisation."""

import math

import pytest
import torch

import pretrainer
from conftest import objective, step_grads, tiny_llama
from pretrainer.config import ModelConfig
from pretrainer.errors import ConfigError
from pretrainer.model import build_model
from pretrainer.model.generation import sample_next
from pretrainer.model.info import model_info
from pretrainer.config import model_preset

SMALL = dict(n_layer=2, n_head=4, d_model=32, vocab_size=97, max_seq_len=64)
FAMILIES = {
    "gpt2": dict(SMALL, **{"_preset": "gpt2-small"}),
    "llama-gqa": dict(SMALL, n_kv_heads=2, **{"_preset": "llama-tiny"}),
    "llama-mqa": dict(SMALL, n_kv_heads=1, **{"_preset": "llama-tiny"}),
    "postnorm-sinusoidal": dict(SMALL, prenorm=False, position="sinusoidal", **{"_preset": "gpt"}),
    # parallel blocks: PaLM's (one shared norm, multi-query) and GPT-NeoX's (a norm per branch,
    # a quarter of each head rotated)
    "palm": dict(SMALL, **{"_preset": "palm-tiny"}),
    "neox": dict(SMALL, norm="layernorm", bias=True, mlp="gelu", parallel_block=True, rope_fraction=0.25,
                 **{"_preset": "llama-tiny"}),
    "gpt-neo": dict(SMALL, attention_window=5, **{"_preset": "gpt-neo-125m"}),  # global, local
}


def small(name: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(FAMILIES[name])
    preset = kw.pop("_preset")
    return build_model(preset, **kw).eval()


@pytest.mark.parametrize("preset,params,non_emb", [
    ("gpt2-small", 124_439_808, 85_056_000),  # Radford et al. 2019 / HF GPT2LMHeadModel
    ("gpt2-medium", 354_823_168, None),
    ("gpt2-xl", 1_557_611_200, None),
    ("llama2-7b", 6_738_415_616, None),  # HF LlamaForCausalLM, Llama-2-7b config
    ("llama3-8b", 8_030_261_248, None),
])
def test_published_parameter_counts(preset, params, non_emb):
    info = model_info(model_preset(preset))
    assert info["params"] == params
    if non_emb is not None:
        assert info["params_non_embedding"] == non_emb


@pytest.mark.parametrize("name", list(FAMILIES))
def test_causal_attention_never_sees_the_future(name):
    model = small(name)
    x = torch.randint(0, 97, (2, 24))
    t = 13
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # and the change does reach later positions


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kv_cache_logits_equal_full_recomputation(name):
    model = small(name)
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(3)
        parts = [model(x[:, :7], cache=cache).logits,  # prefill
                 model(x[:, 7:12], cache=cache).logits]  # a chunk after cached positions
        parts += [model(x[:, i:i + 1], cache=cache).logits for i in range(12, 20)]  # one by one
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_generation_equals_recomputation_token_for_token(name):
    model = small(name, seed=1)
    x = torch.randint(0, 97, (2, 5))
    with_cache = model.generate(x, 30, use_cache=True)
    without = model.generate(x, 30, use_cache=False)
    assert torch.equal(with_cache, without)
    # and past the context window (64): the cache is rebuilt on the cropped window
    long_a = model.generate(x, 70, use_cache=True)
    long_b = model.generate(x, 70, use_cache=False)
    assert long_a.shape == (2, 75) and torch.equal(long_a, long_b)


def test_greedy_generation_is_the_argmax_of_the_logits():
    model = small("gpt2")
    x = torch.randint(0, 97, (1, 6))
    out = model.generate(x, 3)
    ids = x
    for _ in range(3):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = small("gpt2")
    x = torch.randint(3, 97, (2, 4))
    free = model.generate(x, 8)
    eos = int(free[0, 5])  # the second token row 0 generates greedily
    out = model.generate(x, 8, eos_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {3, 4}
    p = torch.softmax(logits, -1)[0]  # 0.64, 0.24, ... : top_p=0.7 keeps the two most likely
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {3, 4} and p[4] < 0.7 < p[4] + p[3]
    assert int(sample_next(logits, 0.0)) == 4


def test_loss_is_cross_entropy_of_shifted_targets_and_ignores_minus_100():
    model = small("llama-gqa")
    x = torch.randint(0, 97, (2, 10))
    y = torch.randint(0, 97, (2, 10))
    y[0, :4] = -100
    logp = model(x).logits.log_softmax(-1)
    keep = y != -100
    manual = -logp[keep].gather(-1, y[keep][:, None]).mean()
    from pretrainer.model.fast import apply_fast_paths

    clm = objective("clm", model)
    with torch.no_grad():  # the plain path (full logits)
        torch.testing.assert_close(clm.loss(model, {"input_ids": x, "labels": y}), manual)
    apply_fast_paths(model)  # with gradients on: the fused head
    torch.testing.assert_close(clm.loss(model, {"input_ids": x, "labels": y}), manual)


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model("gpt2-small", n_layer=8, d_model=256, n_head=4, vocab_size=500)
    std = 0.02 / math.sqrt(2 * 8)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert abs(proj.std().item() - std) / std < 0.05
    assert abs(qkv.std().item() - 0.02) / 0.02 < 0.05
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    untied = build_model("llama-tiny", vocab_size=500)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_qkv_bias_switches_the_query_key_value_biases_alone():
    def biases(**kw):
        return {n for n, _ in build_model("gpt-nano", vocab_size=50, n_layer=1, **kw).named_parameters()
                if n.startswith("blocks.0.") and n.endswith(".bias")}

    everything = {"blocks.0.norm1.bias", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias",
                  "blocks.0.norm2.bias", "blocks.0.mlp.up.bias", "blocks.0.mlp.down.bias"}
    assert biases() == everything
    assert biases(qkv_bias=False) == everything - {"blocks.0.attn.qkv.bias"}  # GPT-Neo
    assert biases(bias=False, qkv_bias=True) == {"blocks.0.attn.qkv.bias"}  # Qwen-2 style
    with pytest.raises(ConfigError, match="model.qkv_bias='maybe': expected true or false"):
        pretrainer.config.load_config(overrides=["model.qkv_bias=maybe"])
    with pytest.raises(ConfigError, match="model.qkv_bias=2"):
        ModelConfig(qkv_bias=2).validate()


def test_build_model_overrides_are_checked():
    with pytest.raises(ConfigError, match="n_layers.*did you mean 'n_layer'"):
        build_model("gpt2-small", n_layers=2)
    with pytest.raises(ConfigError, match="divisible"):
        build_model("gpt2-small", d_model=100, n_head=3)
    with pytest.raises(ConfigError, match="did you mean 'llama-tiny'"):
        build_model("llama-tnyi")
    m = pretrainer.build_model("gpt-nano", vocab_size=65)
    assert m(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 65)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_fused_head_loss_and_gradients_equal_the_plain_path(name):
    model = small(name).train()
    x = torch.randint(0, 97, (3, 40))
    y = torch.randint(0, 97, (3, 40))
    y[1, 5:9] = -100
    plain = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    from pretrainer.model.fast import apply_fast_paths

    fused = objective("clm", apply_fast_paths(model)).loss(model, {"input_ids": x, "labels": y})
    (2.0 * fused).backward()  # the upstream gradient is honoured
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.0 * ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_hand_written_backwards_match_autograd_of_the_plain_formulas():
    """The attention head split (with and without rotary), RMSNorm and SwiGLU have their own backward
    passes; gradients must equal autograd's through the textbook expressions (float64)."""
    from pretrainer.model.fast import _SplitHeads, _SwiGLU
    from pretrainer.model.layers import Rotary

    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 4, 2, 8
    qkv = torch.randn(B, T, H + 2 * Hkv, D, dtype=torch.float64, requires_grad=True)
    rot = Rotary(D, 16, 10000.0).double()
    cos, sin = rot.tables(3, T, torch.float64)
    sin_full = torch.cat([sin, sin], dim=-1)

    def rotate(x):  # x [B, h, T, D]: x * cos + rotate_half(x) * sin (Su et al. 2021; HF Llama)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin_full

    w = [torch.randn(B, n, T, D, dtype=torch.float64) for n in (H, Hkv, Hkv)]
    for rotary in (True, False):
        got = _SplitHeads.apply(qkv, cos if rotary else None, sin if rotary else None, H, Hkv)
        heads = qkv.transpose(1, 2)
        ref = (heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:])
        if rotary:
            ref = (rotate(ref[0]), rotate(ref[1]), ref[2])
        for a, b in zip(got, ref):
            assert torch.allclose(a, b)
        g_got = torch.autograd.grad(sum((a * wi).sum() for a, wi in zip(got, w)), qkv)[0]
        g_ref = torch.autograd.grad(sum((b * wi).sum() for b, wi in zip(ref, w)), qkv)[0]
        assert torch.allclose(g_got, g_ref)

    from pretrainer.model.fast import _RMSNorm

    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 16, dtype=torch.float64)
    got = _RMSNorm.apply(x, w, 1e-6)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # Zhang & Sennrich (2019)
    assert torch.allclose(got, ref)
    for a, b in zip(torch.autograd.grad((got * dy).sum(), (x, w)), torch.autograd.grad((ref * dy).sum(), (x, w))):
        assert torch.allclose(a, b)

    h = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 6, dtype=torch.float64)
    got = _SwiGLU.apply(h)
    ref = torch.nn.functional.silu(h[..., :6]) * h[..., 6:]
    assert torch.allclose(got, ref)
    assert torch.allclose(torch.autograd.grad((got * dy).sum(), h)[0], torch.autograd.grad((ref * dy).sum(), h)[0])


def test_bf16_autocast_training_step_on_cpu_matches_float32_closely():
    """train.dtype=bfloat16 runs the fused pieces under autocast: queries, keys and values come
    out in the projection's dtype and the gradients stay close to a float32 step."""
    model, x = tiny_llama()
    ref, g_ref = step_grads(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, g = step_grads(model, x)
    assert abs(loss.item() - ref.item()) < 0.05
    cos = [torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten(), dim=0).item()
           for a, b in zip(g, g_ref)]
    assert min(cos) > 0.95


def test_grouped_query_attention_shares_heads_like_copies():
    """Keys/values shared by groups of query heads (enable_gqa on a CPU) give what copying each
    key/value head to its group gives (the path used elsewhere), causal and with a padding mask."""
    import torch.nn.functional as F

    from pretrainer.model.layers import _share_kv_heads

    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    k2, v2, extra = _share_kv_heads(k, v, 6)
    copies = (k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    for kw in (dict(is_causal=True), dict(attn_mask=mask)):
        got = F.scaled_dot_product_attention(q, k2, v2, **kw, **extra)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, *copies, **kw))
    assert _share_kv_heads(k, v, 3)[2] == {}  # as many key/value heads as query heads: untouched


def test_a_decoder_with_t5s_tied_head_scales_its_hidden_states():
    """scale_tied_output (T5 v1.0) means the same on a decoder as on an encoder-decoder: the final
    states times d_model**-0.5 before the tied output; GPT-2 and Llama exports refuse it."""
    import pytest as _pytest

    from pretrainer.errors import PretrainerError
    from pretrainer.interop.hf import hf_family

    torch.manual_seed(0)
    plain = build_model("gpt-nano", vocab_size=50).eval()
    scaled = build_model("gpt-nano", vocab_size=50, scale_tied_output=True).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (1, 9))
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits * 48 ** -0.5)
    with _pytest.raises(PretrainerError, match="scale_tied_output"):
        hf_family(scaled.cfg)


def test_t5_initialisation_shrinks_queries_only_for_unscaled_attention():
    """init_scheme=t5 starts the query rows 1/sqrt(head_dim) smaller only when the scores are not
    divided by sqrt(head_dim) themselves (attn_scale=false, T5); otherwise it would do it twice."""
    torch.manual_seed(0)
    t5 = build_model("t5-tiny", vocab_size=64)
    torch.manual_seed(0)
    scaled = build_model("t5-tiny", vocab_size=64, attn_scale=True)
    q_rows = t5.encoder.blocks[0].attn.qkv.query_rows
    w, w_scaled = t5.encoder.blocks[0].attn.qkv.weight, scaled.encoder.blocks[0].attn.qkv.weight
    torch.testing.assert_close(w[:q_rows] * 8.0, w_scaled[:q_rows])  # head_dim 64
    torch.testing.assert_close(w[q_rows:], w_scaled[q_rows:])


def test_factorised_embeddings_are_d_embed_wide_and_projected_up():
    """ALBERT's factorisation (Lan et al. 2020, section 3.1): V x E embeddings and an E x H map
    instead of V x H; the MLM transform maps back to E for the tied output. The count differs from
    BERT's by exactly those matrices, and the model still computes."""
    import dataclasses

    from pretrainer.config import model_preset
    from pretrainer.errors import ConfigError
    from pretrainer.model import make_model
    from pretrainer.model.info import model_info

    bert = model_preset("bert-tiny")
    bert.vocab_size = 100
    E, H, V, P, T = 32, bert.d_model, 100, bert.max_seq_len, bert.type_vocab_size
    albert = dataclasses.replace(bert, d_embed=E)
    albert.validate()
    model = make_model(albert)
    assert model.tok_emb.weight.shape == (V, E) and model.mlm.out.weight is model.tok_emb.weight
    embeddings = lambda d: (V + P + T) * d + 2 * d  # tables and their norm
    backbone = model_info(bert)["params"] - embeddings(H) + embeddings(E) + E * H + H  # + embed_proj
    assert model_info(albert)["params"] == backbone  # info counts the backbone (no MLM head)
    head = H * E + E + 2 * E + V  # the MLM transform, E wide, and the output bias
    assert sum(p.numel() for p in model.parameters()) == backbone + head
    assert model(torch.randint(0, V, (2, 9))).logits.shape == (2, 9, V)
    for bad, message in [(dict(arch="decoder"), "applies to arch=encoder only"),
                         (dict(mlm_head=False), "needs model.mlm_head=true")]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(albert, **bad).validate()
