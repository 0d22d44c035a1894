"""Hugging Face import and export that cannot be silently wrong: T5 and mT5 heads (tied and
rescaled, tied, untied) as the installed ``transformers`` saves them, Qwen2, Gemma, a bare
``BertModel``; and the refusals: a tensor, a config field or a model weight that the family's name
table does not map is a one-line error naming it.

Every reference is built by the installed ``transformers`` from a tiny config, perturbed and saved
with ``save_pretrained`` (so a release that changes its files breaks a test, not a user); logits
are compared at 1e-5. "Identity": export -> ``from_pretrained`` -> ``save_pretrained`` -> import
gives back the same config and the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from pretrainer.errors import PretrainerError  # noqa: E402
from pretrainer.interop.hf import (  # noqa: E402
    config_from_hf, export_hf, hf_folder_config, import_hf,
)
from pretrainer.model import build_model  # noqa: E402
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 120
TOL = dict(atol=1e-5, rtol=1e-5)


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _one_line_error(fn, *names) -> str:
    with pytest.raises(PretrainerError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


def _load(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def _same_model(a, b, same_config: bool = True) -> None:
    if same_config:
        assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------
# T5 and mT5: the head's tying and rescaling as transformers 5 saves them


def _hf_t5(variant: str):
    """``v1.0``: ReLU, tied and rescaled; ``v1.1``: gated-GELU from ``tie_word_embeddings=False``,
    which transformers 5 builds tied and unscaled; ``v1.1-untied``: the same with a head of its own
    (google/t5-v1_1-* as transformers 5 loads and saves them); ``mt5`` / ``mt5-untied``."""
    mt5 = variant.startswith("mt5")
    cls, config_cls = ((transformers.MT5ForConditionalGeneration, transformers.MT5Config) if mt5
                       else (transformers.T5ForConditionalGeneration, transformers.T5Config))
    kw = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16)
    if variant == "v1.0":
        config = config_cls(feed_forward_proj="relu", **kw)
    else:
        config = config_cls(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    hf = cls(config)
    if variant.endswith("untied"):
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    return _perturb(hf)


T5_VARIANTS = ["v1.0", "v1.1", "v1.1-untied", "mt5", "mt5-untied"]


def _t5_logits(model, hf_style: bool):
    x, y = _ids(2, 11, 1), _ids(2, 6, 2)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        if hf_style:
            return model(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        return model(x, decoder_input_ids=y, attention_mask=mask).logits


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_t5_heads_import_export_and_round_trip(tmp_path, variant):
    hf = _hf_t5(variant)
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    if variant == "v1.1":  # what issue 19 found: transformers 5 writes "tied" for an unscaled head
        assert saved["tie_word_embeddings"] is True and saved["scale_decoder_outputs"] is False
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.tie_embeddings == (not variant.endswith("untied"))
    assert ours.cfg.scale_tied_output == (variant == "v1.0")
    assert ours.cfg.mlp == ("relu" if variant == "v1.0" else "geglu_tanh")
    assert hf_folder_config(tmp_path / "hf") == ours.cfg  # (init_from reads the config without the weights)
    theirs = _t5_logits(hf, hf_style=True)
    torch.testing.assert_close(_t5_logits(ours, hf_style=False), theirs, **TOL)

    export_hf(ours, tmp_path / "out")
    back = _load(transformers.AutoModelForSeq2SeqLM, tmp_path / "out")
    torch.testing.assert_close(_t5_logits(back, hf_style=True), theirs, **TOL)
    back.save_pretrained(tmp_path / "again")
    _same_model(import_hf(tmp_path / "again"), ours)


def test_t5_written_before_scale_decoder_outputs_existed(tmp_path):
    """transformers 4.x files: no scale_decoder_outputs; tie_word_embeddings false means an
    untied, unscaled head (v1.1), true a tied, rescaled one (v1.0)."""
    hf = _hf_t5("v1.1-untied")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scale_decoder_outputs"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    ours = import_hf(tmp_path)
    assert (ours.cfg.tie_embeddings, ours.cfg.scale_tied_output) == (False, False)
    torch.testing.assert_close(_t5_logits(ours, False), _t5_logits(hf, True), **TOL)
    assert config_from_hf({**config, "tie_word_embeddings": True}).scale_tied_output
    assert not config_from_hf({**config, "tie_word_embeddings": False}).scale_tied_output


def test_t5_refuses_what_it_cannot_hold(tmp_path):
    config = _hf_t5("v1.0").config.to_dict()
    # a head of its own that transformers would also rescale: pretrainer rescales tied heads only
    hf = _hf_t5("v1.1-untied")
    hf.config.scale_decoder_outputs = True
    hf.save_pretrained(tmp_path / "untied-scaled")
    _one_line_error(lambda: import_hf(tmp_path / "untied-scaled"), "lm_head.weight", "scale_decoder_outputs")
    derived = {k: v for k, v in config.items() if k not in ("dense_act_fn", "is_gated_act")}
    _one_line_error(lambda: config_from_hf({**derived, "feed_forward_proj": "gated-relu"}), "gated-relu")
    _one_line_error(lambda: config_from_hf({**config, "dense_act_fn": "tanh"}), "dense_act_fn='tanh'")
    mt5 = _hf_t5("mt5").config.to_dict()
    _one_line_error(lambda: config_from_hf({**mt5, "scale_decoder_outputs": True}), "scale_decoder_outputs")
    # a stack's copy of the shared embedding that is not the shared embedding
    _hf_t5("v1.0").save_pretrained(tmp_path / "copy")
    weights = load_file(str(tmp_path / "copy" / "model.safetensors"))
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"] + 1
    save_file(weights, str(tmp_path / "copy" / "model.safetensors"))
    _one_line_error(lambda: import_hf(tmp_path / "copy"), "encoder.embed_tokens.weight", "shared.weight")


def test_t5_mlp_variants_export_and_import(tmp_path):
    """gated-silu and a plain GELU (the other feed_forward_proj values our MLPs have)."""
    for mlp in ("swiglu", "gelu"):
        torch.manual_seed(0)
        ours = _perturb(build_model("t5-small", n_layer=1, d_model=32, n_head=4, d_ff=48, vocab_size=V, mlp=mlp))
        export_hf(ours, tmp_path / mlp)
        back = _load(transformers.AutoModelForSeq2SeqLM, tmp_path / mlp)
        torch.testing.assert_close(_t5_logits(back, True), _t5_logits(ours, False), **TOL)
        _same_model(import_hf(tmp_path / mlp), ours, same_config=False)  # (a preset's name is not exported)


# ----------------------------------------------------------------------------------------------
# Qwen2 and Gemma


def _hf_qwen2(tie: bool):
    config = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=V,
                                      max_position_embeddings=64, tie_word_embeddings=tie,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                      attn_implementation="eager")
    return _perturb(transformers.Qwen2ForCausalLM(config))


def _hf_gemma(tie: bool, head_dim: int = 24):
    config = transformers.GemmaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=head_dim, intermediate_size=96,
                                      vocab_size=V, max_position_embeddings=64, tie_word_embeddings=tie,
                                      attn_implementation="eager")
    return _perturb(transformers.GemmaForCausalLM(config))


DECODERS = {"qwen2": _hf_qwen2, "gemma": _hf_gemma}


@pytest.mark.parametrize("family", list(DECODERS))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_decoder_families_import_export_and_round_trip(tmp_path, family, tie):
    hf = DECODERS[family](tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs, **TOL)
    assert ours.cfg.tie_embeddings == tie
    if family == "gemma":
        assert (ours.cfg.embed_scale, ours.cfg.head_dim, ours.cfg.mlp) == (True, 24, "geglu_tanh")
    else:
        assert (ours.cfg.bias, ours.cfg.qkv_bias) == (False, True)
    export_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    back = _load(transformers.AutoModelForCausalLM, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs, **TOL)
    back.save_pretrained(tmp_path / "again")
    _same_model(import_hf(tmp_path / "again"), ours)


def test_decoder_family_configs_refuse_what_they_cannot_hold():
    qwen2 = _hf_qwen2(False).config.to_dict()
    # a sliding window in the upper layers: exact for every sequence inside it, which caps max_seq_len
    cfg = config_from_hf({**qwen2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
                          "layer_types": ["full_attention", "sliding_attention"]})
    assert cfg.max_seq_len == 16
    assert config_from_hf({**qwen2, "sliding_window": 16}).max_seq_len == 64  # (unused without use_sliding_window)
    _one_line_error(lambda: config_from_hf({**qwen2, "layer_types": ["full_attention", "chunked_attention"]}),
                    "chunked_attention")
    _one_line_error(lambda: config_from_hf({**qwen2, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
                    "rope_type='yarn'")
    _one_line_error(lambda: config_from_hf({**qwen2, "rope_parameters": {"rope_theta": 1e6, "factor": 4.0}}),
                    "rope_parameters.factor")
    _one_line_error(lambda: config_from_hf({**qwen2, "rope_theta": 1e4}), "rope_theta")  # disagrees
    gemma = _hf_gemma(True).config.to_dict()
    assert config_from_hf({**gemma, "hidden_act": "gelu"}).mlp == "geglu_tanh"  # transformers 5 reads it so
    _one_line_error(lambda: config_from_hf({**gemma, "attention_bias": True}), "attention_bias=True")
    _one_line_error(lambda: config_from_hf({**gemma, "hidden_activation": "silu"}), "hidden_activation")
    _one_line_error(lambda: config_from_hf({**gemma, "final_logit_softcapping": 30.0}), "final_logit_softcapping")


def test_llama_with_its_own_head_dim_imports(tmp_path):
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=96, vocab_size=V,
                                      max_position_embeddings=64, attn_implementation="eager")
    hf = _perturb(transformers.LlamaForCausalLM(config))
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, hf(_ids()).logits, **TOL)


# ----------------------------------------------------------------------------------------------
# A bare BertModel: the backbone, with an MLM head drawn afresh


def _hf_bert_model():
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    return _perturb(transformers.BertModel(config))


def test_bare_bert_model_imports_as_a_backbone(tmp_path):
    hf = _hf_bert_model()
    hf.save_pretrained(tmp_path / "hf")
    said = []
    ours = import_hf(tmp_path / "hf", say=said.append)
    assert len(said) == 1 and "BertModel" in said[0] and "MLM head" in said[0] and "drawn afresh" in said[0]
    ids, types = _ids(2, 10), torch.tensor([[0] * 5 + [1] * 5] * 2)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h = ours.hidden_states(ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(h[0], ref.last_hidden_state[0], **TOL)
        torch.testing.assert_close(h[1, :7], ref.last_hidden_state[1, :7], **TOL)
        torch.testing.assert_close(ours.pooled(h), ref.pooler_output, **TOL)
    again = import_hf(tmp_path / "hf")  # the drawn head is the same at every import
    assert torch.equal(again.mlm.dense.weight, ours.mlm.dense.weight)
    assert torch.equal(ours.mlm.out.bias, torch.zeros(V)) and torch.equal(ours.mlm.norm.weight, torch.ones(32))

    export_hf(ours, tmp_path / "out")  # as BertForMaskedLM with the pooler, which BertModel reads
    back = transformers.BertModel.from_pretrained(tmp_path / "out").eval()  # (the MLM head: unexpected)
    with torch.no_grad():
        out, ref = back(input_ids=ids, token_type_ids=types), hf(input_ids=ids, token_type_ids=types)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, **TOL)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, **TOL)
    # the run folder keeps the note, and `pretrainer import` says it
    from pretrainer.cli import main
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    state = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert "drawn afresh" in state["import_notes"][0]
    # a head present in part is an error, not a head drawn afresh
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    del weights["cls.predictions.transform.dense.bias"]
    save_file(weights, str(tmp_path / "out" / "model.safetensors"))
    _one_line_error(lambda: import_hf(tmp_path / "out"), "cls.predictions.transform.dense.bias")


def test_fine_tuning_starts_from_a_bare_bert_model(tmp_path):
    from pretrainer.finetune import finetune
    from pretrainer.tokenization import Tok

    words = "good great fine nice bad awful poor dull the a film was".split()
    tok = Tok.train([" ".join(words)] * 3, "wordpiece", 60)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
    _perturb(transformers.BertModel(config)).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    rows = [{"text": f"the film was {w}", "label": int(w in ("bad", "awful", "poor", "dull"))}
            for w in ("good", "great", "fine", "nice", "bad", "awful", "poor", "dull")] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = finetune(str(tmp_path / "hf"), "classification", str(tmp_path / "train.jsonl"), str(tmp_path / "ft"),
                      epochs=1, batch_size=16, max_len=12, quiet=True)
    assert result is not None and (tmp_path / "ft" / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------------------------
# Strict both ways: unknown tensors, unknown config fields, model weights without a name


@pytest.mark.parametrize("family", ["t5", "qwen2", "gemma", "bert"])
def test_an_unknown_tensor_or_config_field_is_refused(tmp_path, family):
    hf = {"t5": lambda: _hf_t5("v1.1"), "qwen2": lambda: _hf_qwen2(True), "gemma": lambda: _hf_gemma(True),
          "bert": _hf_bert_model}[family]()
    hf.save_pretrained(tmp_path)
    import_hf(tmp_path)  # as saved: fine
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    _one_line_error(lambda: import_hf(tmp_path), "model.safetensors", "unexpected tensor", "extra.weight'")
    save_file(weights, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "logit_scale": 2.0}))
    _one_line_error(lambda: import_hf(tmp_path), "config.json", "'logit_scale'")
    # fields that change nothing the model computes are fine: labels, generation defaults, dropouts
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_beams": 4, "id2label": {"0": "a"},
                                                      "summary_first_dropout": 0.3}))
    import_hf(tmp_path)


def test_a_tied_copy_that_differs_is_untied_or_refused(tmp_path):
    """A config that ties the output to the embedding over a checkpoint whose output matrix differs:
    transformers 5 unties the two, and so does the import where the family has an output of its own;
    BERT's output is always the embedding, so it is refused."""
    hf = _hf_qwen2(True)
    hf.save_pretrained(tmp_path / "q")
    weights = load_file(str(tmp_path / "q" / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1
    save_file(weights, str(tmp_path / "q" / "model.safetensors"))
    ref = _load(transformers.AutoModelForCausalLM, tmp_path / "q")
    ours = import_hf(tmp_path / "q")
    assert not ours.cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, **TOL)
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    _perturb(transformers.BertForMaskedLM(config)).save_pretrained(tmp_path / "b")
    weights = load_file(str(tmp_path / "b" / "model.safetensors"))
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"] + 1
    save_file(weights, str(tmp_path / "b" / "model.safetensors"))
    _one_line_error(lambda: import_hf(tmp_path / "b"), "cls.predictions.decoder.weight", "differs")


def test_export_refuses_a_weight_it_has_no_name_for(tmp_path):
    model = build_model("llama-tiny", n_layer=1, vocab_size=V)
    model.blocks[0].attn.extra_scale = torch.nn.Parameter(torch.ones(4))  # a weight no table maps
    _one_line_error(lambda: export_hf(model, tmp_path / "out"), "blocks.0.attn.extra_scale", "llama")
    assert not (tmp_path / "out").exists()
    # embed_scale converts as Gemma (a rope decoder) or BART only
    _one_line_error(lambda: export_hf(build_model("gpt-nano", n_layer=1, vocab_size=V, embed_scale=True),
                                      tmp_path / "out"), "embed_scale")


def test_bart_scale_embedding_both_ways(tmp_path):
    config = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=32, scale_embedding=True)
    hf = _perturb(transformers.BartForConditionalGeneration(config))
    with torch.no_grad():
        hf.final_logits_bias.zero_()
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.embed_scale
    theirs = _t5_logits(hf, True)
    torch.testing.assert_close(_t5_logits(ours, False), theirs, **TOL)
    export_hf(ours, tmp_path / "out")
    back = _load(transformers.AutoModelForSeq2SeqLM, tmp_path / "out")
    torch.testing.assert_close(_t5_logits(back, True), theirs, **TOL)
