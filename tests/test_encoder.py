"""The encoder-only model (BERT): published sizes, bidirectional attention, padding, and parity
with Hugging Face ``BertForMaskedLM`` / ``BertModel`` in both directions, built locally from random
weights with every parameter perturbed (biases and norm gains included)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import objective
from pretrainer.config import model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.interop.hf import export_hf, hf_family, import_hf
from pretrainer.model import EncoderLM, build_model
from pretrainer.model.info import model_info

V = 300
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=V, max_seq_len=64, n_layer=2, d_model=32, n_head=4)


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _inputs(batch: int = 2, length: int = 20, seed: int = 1):
    """ids, two segments (0 then 1), and padding after position 15 of the second row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return ids, types, mask


def test_bert_base_has_bertmodels_parameter_count():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.BertModel(transformers.BertConfig())
    expected = sum(p.numel() for p in hf.parameters())
    assert expected == 109_482_240
    info = model_info(model_preset("bert-base"))
    assert info["params"] == expected
    # the MLM head's own parameters: transform dense + LayerNorm, output bias (matrix is tied)
    assert info["params_mlm_head"] == 768 * 768 + 768 + 2 * 768 + 30522
    model = build_model("bert-base", device="meta")
    assert isinstance(model, EncoderLM)
    assert sum(p.numel() for p in model.parameters()) == expected + info["params_mlm_head"]


@pytest.mark.parametrize("name,layers,width,heads", [
    ("bert-tiny", 2, 128, 2), ("bert-mini", 4, 256, 4), ("bert-small", 4, 512, 8),
    ("bert-medium", 8, 512, 8), ("bert-large", 24, 1024, 16)])
def test_compact_and_large_presets(name, layers, width, heads):
    cfg = model_preset(name)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.ff_dim) == (layers, width, heads, 4 * width)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.type_vocab_size, cfg.norm_eps) == (30522, 512, 2, 1e-12)


def test_bidirectional_attention_sees_later_tokens():
    model = _perturb(build_model("bert-tiny", **SMALL))
    ids, _, _ = _inputs()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1 - 7) % (V - 7) + 7
    a, b = model(ids).hidden_states, model(changed).hidden_states
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first position sees the last token


def test_padding_does_not_change_real_tokens():
    model = _perturb(build_model("bert-tiny", **SMALL))
    ids, types, mask = _inputs()
    full = model(ids, token_type_ids=types, attention_mask=mask).logits
    short = model(ids[-1:, :15], token_type_ids=types[-1:, :15]).logits
    torch.testing.assert_close(full[-1, :15], short[0], **TOL)


def test_loss_counts_only_labelled_positions():
    model = _perturb(build_model("bert-tiny", **SMALL))
    ids, _, _ = _inputs()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = 11, 12
    out = model(ids)
    expected = torch.nn.functional.cross_entropy(
        torch.stack([out.logits[0, 3], out.logits[1, 7]]), torch.tensor([11, 12]))
    mlm = objective("mlm", model)  # the head runs on the labelled positions only
    torch.testing.assert_close(mlm.loss(model, {"input_ids": ids, "labels": labels}), expected)
    sums = mlm.eval_sums(model, {"input_ids": ids, "labels": labels})
    assert sums["count"] == 2 and sums["correct"] == int(out.logits[0, 3].argmax() == 11) + int(out.logits[1, 7].argmax() == 12)


def test_pooler_is_tanh_dense_on_first_token():
    model = _perturb(build_model("bert-tiny", **SMALL))
    h = model(_inputs()[0]).hidden_states
    torch.testing.assert_close(model.pooled(h), torch.tanh(model.pooler(h[:, 0])))


def test_objective_must_fit_architecture():
    from pretrainer.config import load_config

    with pytest.raises(ConfigError, match="objective=clm trains arch=decoder"):
        load_config(None, ["model=bert-tiny", "objective=clm"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="objective=mlm trains arch=encoder"):
        load_config(None, ["model=gpt-nano", "objective=mlm"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="type_vocab_size=2 applies to arch=encoder"):
        load_config(None, ["model=gpt-nano", "model.type_vocab_size=2"]).validate(need_paths=False)


# ----------------------------------------------------------------------------------------------
# Hugging Face parity


def _hf_bert(seed: int = 1, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    return transformers, _perturb(transformers.BertForMaskedLM(config), seed)


def test_export_loads_in_bert_for_masked_lm_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _perturb(build_model("bert-tiny", **SMALL))
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    hf.eval()
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask).logits
        b = hf(ids, token_type_ids=types, attention_mask=mask).logits
    torch.testing.assert_close(a, b, **TOL)
    # the backbone with its pooler loads in BertModel
    base = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        h = ours(ids, token_type_ids=types, attention_mask=mask).hidden_states
        ref = base(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(h, ref.last_hidden_state, **TOL)
    torch.testing.assert_close(ours.pooled(h), ref.pooler_output, **TOL)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_import_bert_for_masked_lm_gives_same_logits(tmp_path, act):
    _, hf = _hf_bert(hidden_act=act)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert isinstance(ours, EncoderLM) and ours.pooler is None  # BertForMaskedLM has none
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask).logits
        b = hf(ids, token_type_ids=types, attention_mask=mask).logits
    torch.testing.assert_close(a, b, **TOL)


def test_unconvertible_encoder_is_refused():
    cfg = model_preset("bert-tiny")
    cfg.prenorm = True
    with pytest.raises(PretrainerError, match="model.prenorm=True has no Hugging Face equivalent"):
        hf_family(cfg)


def test_run_folder_loads_as_encoder(tmp_path):
    import pretrainer
    from pretrainer.interop.hf import import_run

    _, hf = _hf_bert()
    hf.save_pretrained(tmp_path / "hf")
    import_run(tmp_path / "hf", tmp_path / "run")
    model = pretrainer.load(tmp_path / "run")
    ids, types, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, token_type_ids=types, attention_mask=mask).logits,
                                   hf(ids, token_type_ids=types, attention_mask=mask).logits, **TOL)


@pytest.mark.slow
def test_bert_base_parity_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(7, 30522, (2, 64), generator=torch.Generator().manual_seed(0))
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    types[:, 32:], mask[1, 50:] = 1, 0
    ours = _perturb(build_model("bert-base"), scale=0.02)
    export_hf(ours, tmp_path / "out")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, token_type_ids=types, attention_mask=mask).logits,
                                   hf(ids, token_type_ids=types, attention_mask=mask).logits, **TOL)
    torch.manual_seed(1)
    hf = _perturb(transformers.BertForMaskedLM(transformers.BertConfig()), 1, scale=0.02)
    hf.save_pretrained(tmp_path / "in")
    ours = import_hf(tmp_path / "in")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, token_type_ids=types, attention_mask=mask).logits,
                                   hf(ids, token_type_ids=types, attention_mask=mask).logits, **TOL)
