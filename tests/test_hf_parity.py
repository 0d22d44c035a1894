"""Parity with Hugging Face ``transformers`` (a test-only dependency), built locally from random weights.

Both directions are checked for GPT-2, GPT-Neo, Llama and GPT-NeoX shaped models: a Hugging Face model saved with
``save_pretrained`` and read by ``import_hf`` gives the same logits as the original, and a model of
ours written by ``export_hf`` loads in ``AutoModelForCausalLM`` with no missing or unexpected weights
and gives the same logits. Every parameter is perturbed first, so biases and norm gains are not
their trivial initial values.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import pretrainer

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from safetensors.torch import load_file  # noqa: E402

from pretrainer.errors import PretrainerError  # noqa: E402
from pretrainer.interop.hf import config_from_hf, export_hf, import_hf, to_hf_state_dict  # noqa: E402
from pretrainer.model import build_model  # noqa: E402

V, T = 300, 64  # vocabulary and context of the tiny models
TOL = dict(atol=1e-5, rtol=1e-5)

# (n_kv_heads, tie_embeddings, bias, mlp): GQA, MHA, tied, and biases with GeGLU
LLAMA_VARIANTS = {
    "gqa": (2, False, False, "swiglu"),
    "mha": (4, False, False, "swiglu"),
    "tied": (2, True, False, "swiglu"),
    "bias-geglu": (2, False, True, "geglu"),
}

# GPT-NeoX (use_parallel_residual, tie_word_embeddings), Pythia's quarter of each head rotated
NEOX_VARIANTS = {"parallel": (True, False), "serial": (False, False), "parallel-tied": (True, True)}
NEOX_ROPE = dict(rope_theta=10000.0, rope_fraction=0.25)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ids(batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ours_gpt2(**kw):
    return _perturb(build_model("gpt2-small", n_layer=2, d_model=64, n_head=4, vocab_size=V,
                                max_seq_len=T, **kw))


def _ours_llama(variant: str):
    n_kv, tie, bias, mlp = LLAMA_VARIANTS[variant]
    return _perturb(build_model("llama-tiny", n_layer=2, d_model=64, n_head=4, n_kv_heads=n_kv,
                                d_ff=96, vocab_size=V, max_seq_len=T, tie_embeddings=tie, bias=bias,
                                mlp=mlp, rope_theta=500000.0))


def _ours_neox(variant: str):
    parallel, tie = NEOX_VARIANTS[variant]
    return _perturb(build_model("llama-tiny", n_layer=2, d_model=64, n_head=4, n_kv_heads=None, d_ff=96,
                                vocab_size=V, max_seq_len=T, norm="layernorm", bias=True, mlp="gelu",
                                parallel_block=parallel, tie_embeddings=tie, **NEOX_ROPE))


def _hf_neox(variant: str):
    parallel, tie = NEOX_VARIANTS[variant]
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                           vocab_size=V, max_position_embeddings=T, use_parallel_residual=parallel,
                           tie_word_embeddings=tie, hidden_act="gelu",
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25},
                           attn_implementation="eager")
    return _perturb(GPTNeoXForCausalLM(config))


def _hf_gpt2(tie: bool = True):
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=T,
                        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                        attn_implementation="eager")
    return _perturb(GPT2LMHeadModel(config))


def _hf_llama(variant: str):
    n_kv, tie, bias, mlp = LLAMA_VARIANTS[variant]
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=n_kv, intermediate_size=96, vocab_size=V,
                         max_position_embeddings=T, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         attention_bias=bias, mlp_bias=bias,
                         hidden_act={"swiglu": "silu", "geglu": "gelu"}[mlp],
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         attn_implementation="eager")
    return _perturb(LlamaForCausalLM(config))


# GPT-Neo: alternating global and local layers, a window shorter than the 40-token inputs
NEO_WINDOW = 8


def _ours_gpt_neo(**kw):
    kw = {**dict(n_layer=4, d_model=64, n_head=4, d_ff=96, vocab_size=V, max_seq_len=T,
                 attention_window=NEO_WINDOW), **kw}
    return _perturb(build_model("gpt-neo-125m", **kw))


def _hf_gpt_neo(tie: bool = True, types=(("global", "local"), 2)):
    config = GPTNeoConfig(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=96, vocab_size=V,
                          max_position_embeddings=T, attention_types=[[list(types[0]), types[1]]],
                          window_size=NEO_WINDOW, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                          attn_implementation="eager")
    return _perturb(GPTNeoForCausalLM(config))


def _compare(ours, hf, ids=None):
    ids = _ids() if ids is None else ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def _load_hf(folder):
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return hf.eval()


def _exported_keys_match(model, hf) -> None:
    """The exported tensors are exactly the Hugging Face model's (less a tied output matrix)."""
    _, weights = to_hf_state_dict(model)
    hf_keys = set(hf.state_dict())
    if model.cfg.tie_embeddings:
        hf_keys.discard("lm_head.weight")
    # GPT-NeoX files name the output matrix embed_out; transformers 5 renames it lm_head on load
    assert {"lm_head.weight" if k == "embed_out.weight" else k for k in weights} == hf_keys


# ----------------------------------------------------------------------------------------------
# Logits, both directions


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt2_hf_to_ours(tmp_path, tie):
    hf = _hf_gpt2(tie)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.mlp == "gelu_tanh" and ours.cfg.tie_embeddings == tie
    _compare(ours, hf)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt2_ours_to_hf(tmp_path, tie):
    ours = _ours_gpt2(tie_embeddings=tie)
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    _exported_keys_match(ours, hf)
    _compare(ours, hf)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt_neo_hf_to_ours(tmp_path, tie):
    hf = _hf_gpt_neo(tie)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    cfg = ours.cfg
    assert (cfg.attention_layers, cfg.attention_window, cfg.attn_scale, cfg.has_qkv_bias, cfg.bias) == (
        "global,local", NEO_WINDOW, False, False, True)
    assert [b.attn.window for b in ours.blocks] == [None, NEO_WINDOW, None, NEO_WINDOW]
    assert cfg.tie_embeddings == tie and cfg.d_ff == 96 and cfg.mlp == "gelu_tanh"
    _compare(ours, hf)


def test_gpt_neo_layer_patterns_import_as_their_shortest_repeat(tmp_path):
    hf = _hf_gpt_neo(types=(("local", "local", "global", "local"), 1))
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.attention_layers == "local,local,global"  # repeated: local, local, global, local
    _compare(ours, hf)
    cfg = config_from_hf({**hf.config.to_dict(), "attention_types": [[["global"], 4]],
                          "attention_layers": ["global"] * 4})
    assert (cfg.attention_layers, cfg.attention_window) == ("global", None)
    # transformers reads attention_layers, written beside attention_types: the two must agree
    _one_line_error(lambda: config_from_hf({**hf.config.to_dict(), "attention_types": [[["global"], 4]]}),
                    "attention_layers")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt_neo_ours_to_hf(tmp_path, tie):
    ours = _ours_gpt_neo(tie_embeddings=tie)
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == "GPTNeoForCausalLM"
    assert hf.config.attention_layers == ["global", "local", "global", "local"]
    _exported_keys_match(ours, hf)
    _compare(ours, hf)


def test_gpt_neo_pattern_that_does_not_divide_the_layers_exports(tmp_path):
    ours = _ours_gpt_neo(n_layer=3, attention_layers="local,global")  # local, global, local
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    assert hf.config.attention_layers == ["local", "global", "local"]
    _compare(ours, hf)


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_hf_to_ours(tmp_path, variant):
    hf = _hf_llama(variant)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    cfg = ours.cfg
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.bias, cfg.mlp) == LLAMA_VARIANTS[variant]
    assert cfg.rope_theta == 500000.0
    _compare(ours, hf)


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_ours_to_hf(tmp_path, variant):
    ours = _ours_llama(variant)
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    _exported_keys_match(ours, hf)
    _compare(ours, hf)


@pytest.mark.parametrize("variant", NEOX_VARIANTS)
def test_neox_hf_to_ours(tmp_path, variant):
    hf = _hf_neox(variant)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    cfg = ours.cfg
    assert (cfg.parallel_block, cfg.tie_embeddings) == NEOX_VARIANTS[variant]
    assert (cfg.parallel_norms, cfg.rotary_dim, cfg.norm, cfg.mlp) == (2, 4, "layernorm", "gelu")
    _compare(ours, hf)


@pytest.mark.parametrize("variant", NEOX_VARIANTS)
def test_neox_ours_to_hf(tmp_path, variant):
    ours = _ours_neox(variant)
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    assert hf.config.use_parallel_residual == NEOX_VARIANTS[variant][0]
    _exported_keys_match(ours, hf)
    _compare(ours, hf)


def test_neox_query_key_value_rows_are_interleaved_per_head(tmp_path):
    """GPT-NeoX's fused projection holds q, k and v of each head in turn; ours [all q; all k; all v]."""
    ours = _ours_neox("parallel")
    _, weights = to_hf_state_dict(ours)
    hf_qkv = weights["gpt_neox.layers.0.attention.query_key_value.weight"].view(4, 3, 16, 64)
    q, k, v = ours.blocks[0].attn.qkv.weight.view(3, 4, 16, 64)
    for head in range(4):
        assert torch.equal(hf_qkv[head, 0], q[head]) and torch.equal(hf_qkv[head, 1], k[head])
        assert torch.equal(hf_qkv[head, 2], v[head])


def test_neox_transformers_4_config_and_lm_head_name(tmp_path):
    """transformers 4.x writes rotary_pct and rotary_emb_base; an in-memory state dict of 5.x calls
    the output matrix lm_head (files call it embed_out): both import."""
    hf = _hf_neox("parallel")
    config = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"}
    config.update(rotary_pct=0.5, rotary_emb_base=500.0, rope_scaling=None)
    cfg = config_from_hf(config)
    assert (cfg.rope_fraction, cfg.rotary_dim, cfg.rope_theta) == (0.5, 8, 500.0)
    from pretrainer.interop.hf import from_hf_state_dict

    state = hf.state_dict()
    assert "lm_head.weight" in state
    _compare(from_hf_state_dict(config_from_hf(hf.config.to_dict()), state), hf)


def test_import_old_neox_checkpoint_with_buffers(tmp_path):
    """Older GPT-NeoX / Pythia files keep causal-mask and rotary buffers beside the weights."""
    hf = _hf_neox("serial")
    weights = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    for i in range(2):
        weights[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, T, T, dtype=torch.bool))
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    _compare(import_hf(tmp_path), hf)


def test_mistral_sliding_window_imports_as_its_window(tmp_path):
    config = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, vocab_size=V,
                           max_position_embeddings=T, sliding_window=16, attn_implementation="eager")
    hf = _perturb(MistralForCausalLM(config))
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.max_seq_len == 16  # exact for every sequence that fits the window
    _compare(ours, hf, _ids(length=16))


def _ours(family: str):
    if family == "gpt2":
        return _ours_gpt2()
    if family == "gpt_neo":
        return _ours_gpt_neo()
    return _ours_neox(family) if family in NEOX_VARIANTS else _ours_llama(family)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gqa", "tied", "parallel", "serial"])
def test_round_trip_is_exact(tmp_path, family):
    ours = _ours(family)
    export_hf(ours, tmp_path)
    back = import_hf(tmp_path)
    assert dataclasses.replace(back.cfg, preset=None) == dataclasses.replace(ours.cfg, preset=None)
    a, b = ours.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------
# Parameter counts of the full-size presets (meta device: shapes only)


def _hf_gpt1():
    if not hasattr(transformers, "OpenAIGPTLMHeadModel"):
        pytest.skip("transformers has no OpenAIGPTLMHeadModel")
    return transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig())


HF_REFERENCES = {
    "gpt2-small": (124_439_808, lambda: GPT2LMHeadModel(GPT2Config())),
    "gpt2-medium": (354_823_168, lambda: GPT2LMHeadModel(GPT2Config(n_layer=24, n_head=16, n_embd=1024))),
    "llama2-7b": (6_738_415_616, lambda: LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096))),
    "llama3-8b": (8_030_261_248, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=8192))),
    "gpt": (116_534_784, _hf_gpt1),
    # EleutherAI/gpt-neo-125M's config: 12 layers alternating global and local, 2,048 positions
    "gpt-neo-125m": (125_198_592, lambda: GPTNeoForCausalLM(GPTNeoConfig(
        num_layers=12, hidden_size=768, num_heads=12, attention_types=[[["global", "local"], 6]]))),
}


@pytest.mark.parametrize("preset", HF_REFERENCES)
def test_parameter_counts_equal_hf(preset):
    published, make_hf = HF_REFERENCES[preset]
    with torch.device("meta"):
        hf = make_hf()
    ours = build_model(preset, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 - tied weights once
    assert count(ours) == count(hf) == published


# ----------------------------------------------------------------------------------------------
# Greedy generation


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gqa", "parallel"])
def test_greedy_generation_matches_hf(tmp_path, family):
    ours = _ours(family)
    export_hf(ours, tmp_path)
    hf = _load_hf(tmp_path)
    hf.generation_config.eos_token_id = None  # never stop early: compare all the new tokens
    # GPT-Neo: 8 + 16 positions, three windows; our local layers' cache holds the last 8 only
    new = 16 if family == "gpt_neo" else 10
    prompt = _ids(length=8)
    expected = ours.generate(prompt, max_new_tokens=new, temperature=0.0)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
    assert expected.shape == (2, 8 + new)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------
# Folders: tokenizer files, old and sharded checkpoints


def test_export_copies_tokenizer_and_special_ids(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "hello", "world"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials}))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(specials))

    out = export_hf(_ours_gpt2(), tmp_path / "hf", tokenizer_dir=tok_dir)
    config = json.loads((out / "config.json").read_text())
    # a decoder's text starts with what its prompts start with (<eos>, the document separator): bos 2
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 2, 2)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("hello world")["input_ids"] == [2, 4, 5]  # a prompt starts after <eos>, as in generate
    assert hf_tok.eos_token_id == 2
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_import_old_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 files: GPT2Model keys (no ``transformer.``), causal-mask buffers, a .bin."""
    hf = _hf_gpt2()
    weights = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    _compare(import_hf(tmp_path), hf)


def test_import_sharded_checkpoint(tmp_path):
    hf = _hf_llama("gqa")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _compare(import_hf(tmp_path), hf)


def test_export_and_import_need_no_transformers(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from pretrainer.model import build_model\n"
        "from pretrainer.interop.hf import export_hf, import_hf\n"
        "m = build_model('llama-tiny', n_layer=1, d_model=32, n_head=4, vocab_size=50, max_seq_len=16)\n"
        "import_hf(export_hf(m, sys.argv[1]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert set(load_file(tmp_path / "model.safetensors")) >= {"model.embed_tokens.weight", "lm_head.weight"}


# ----------------------------------------------------------------------------------------------
# Refusals: one line, naming the option or the file and field


@pytest.mark.parametrize("preset, overrides, named", [
    ("gpt-nano", dict(prenorm=False), "model.prenorm=False"),
    ("gpt-nano", dict(position="sinusoidal"), "model.position='sinusoidal'"),
    ("gpt-nano", dict(mlp="swiglu"), "model.mlp='swiglu'"),
    ("gpt-nano", dict(n_kv_heads=1), "model.n_kv_heads=1"),
    ("llama-tiny", dict(mlp="gelu"), "model.mlp='gelu'"),
    ("llama-tiny", dict(parallel_block=True), "model.parallel_block=True"),
    ("llama-tiny", dict(rope_fraction=0.5), "model.rope_fraction=0.5"),
    ("palm-tiny", dict(), "model.parallel_norms=1"),  # GPT-J / PaLM's shared norm
    ("palm-tiny", dict(parallel_norms=2), "model.bias=False"),
    ("gpt-nano", dict(parallel_block=True), "model.parallel_block=True"),
    # GPT-2 and Llama have neither local layers nor unscaled scores; GPT-Neo has q/k/v without bias
    ("gpt-nano", dict(attention_layers="local", attention_window=4), "model.attention_layers='local'"),
    ("gpt-nano", dict(qkv_bias=False), "model.qkv_bias=False"),
    ("gpt-neo-125m", dict(qkv_bias=True), "model.qkv_bias=True"),
    ("gpt-neo-125m", dict(n_kv_heads=2), "model.n_kv_heads=2"),
    ("llama-tiny", dict(attention_layers="local", attention_window=4), "model.attention_layers='local'"),
    ("llama-tiny", dict(attn_scale=False), "model.attn_scale=False"),
    ("llama-tiny", dict(bias=True, qkv_bias=False), "model.qkv_bias=False"),  # (q/k/v biases alone: Qwen2)
    ("bert-tiny", dict(attn_scale=False), "model.attn_scale=False"),
])
def test_export_refuses_configs_without_hf_equivalent(tmp_path, preset, overrides, named):
    model = build_model(preset, n_layer=1, vocab_size=50, **overrides)
    with pytest.raises(PretrainerError) as err:
        export_hf(model, tmp_path / "out")
    message = str(err.value)
    assert named in message and "Hugging Face" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def _one_line_error(fn, *names) -> None:
    with pytest.raises(PretrainerError) as err:
        fn()
    assert "\n" not in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_import_errors_name_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet", "hidden_size": 64}))
    _one_line_error(lambda: import_hf(tmp_path), "config.json", "model_type='xlnet'")
    _one_line_error(lambda: import_hf(tmp_path / "nowhere"), "config.json", "missing")
    _one_line_error(lambda: config_from_hf({"model_type": "gpt2", "n_layer": 2}), "config.json", "n_head")
    _one_line_error(lambda: config_from_hf({**_hf_llama("gqa").config.to_dict(),
                                            "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}),
                    "rope_type='llama3'")

    hf = _hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    _one_line_error(lambda: import_hf(tmp_path), str(tmp_path), "model.safetensors")  # no weights
    weights = dict(hf.state_dict(), extra=torch.zeros(1))
    torch.save(weights, tmp_path / "pytorch_model.bin")
    _one_line_error(lambda: import_hf(tmp_path), "pytorch_model.bin", "unexpected tensor 'extra'")
    del weights["extra"], weights["transformer.ln_f.bias"]
    torch.save(weights, tmp_path / "pytorch_model.bin")
    _one_line_error(lambda: import_hf(tmp_path), "pytorch_model.bin", "transformer.ln_f.bias")
    torch.save({"code": _Pickled()}, tmp_path / "pytorch_model.bin")  # never unpickled
    _one_line_error(lambda: import_hf(tmp_path), "pytorch_model.bin", "refusing")


def test_gpt_neo_import_refuses_what_it_cannot_hold():
    base = _hf_gpt_neo().config.to_dict()
    _one_line_error(lambda: config_from_hf({**base, "attention_types": [[["global", "sparse"], 2]]}),
                    "config.json", "'sparse'")
    _one_line_error(lambda: config_from_hf({**base, "attention_types": [[["global", "local"], 3]]}),
                    "attention_types", "num_layers=4")
    _one_line_error(lambda: config_from_hf({**base, "attention_types": "global"}), "attention_types")
    _one_line_error(lambda: config_from_hf({**base, "activation_function": "silu"}),
                    "activation_function='silu'")


class _Pickled:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_neox_import_refuses_what_it_cannot_map():
    config = _hf_neox("parallel").config.to_dict()
    _one_line_error(lambda: config_from_hf({**config, "attention_bias": False}), "attention_bias=False")
    _one_line_error(lambda: config_from_hf({**config, "hidden_act": "silu"}), "hidden_act='silu'")
    _one_line_error(lambda: config_from_hf({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}),
                    "rope_scaling")
    _one_line_error(lambda: config_from_hf({**config, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}), "rope_type='linear'")
    _one_line_error(lambda: config_from_hf({**config, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}}), "rope_fraction")


def test_config_from_transformers_4_llama_config():
    """transformers 4.x writes rope_theta and rope_scaling at the top level."""
    cfg = config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
                          "vocab_size": V, "max_position_embeddings": T, "rope_theta": 5e5,
                          "rope_scaling": None, "rms_norm_eps": 1e-5})
    assert (cfg.rope_theta, cfg.kv_heads, cfg.max_seq_len, cfg.mlp) == (5e5, 2, T, "swiglu")
    _one_line_error(lambda: config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}),
                    "rope_scaling")


def test_cli_import_then_export_round_trip(tmp_path):
    """`pretrainer import HF_DIR --out RUN` then `pretrainer export RUN --format hf` keeps the logits."""
    from pretrainer.cli import main

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=120, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ours = pretrainer.load(tmp_path / "run")
    ids = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=1e-5)
