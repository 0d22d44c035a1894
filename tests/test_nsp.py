"""Next-sentence prediction (BERT, Devlin et al. 2019) and sentence-order prediction (ALBERT, Lan et
al. 2020): the ``BertForPreTraining`` layout (MLM head + ``cls.seq_relationship``) against Hugging
Face in both directions, and the worked behaviour of the ``mlm+nsp`` and ``mlm+sop`` objectives."""

from __future__ import annotations

import json

import pytest
import torch

from pretrainer.config import ModelConfig, load_config, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.interop.hf import export_hf, hf_folder_config, import_hf
from pretrainer.model import build_model
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


def _inputs(batch: int = 3, length: int = 20, seed: int = 1):
    """ids, two segments (0 then 1), and padding after position 15 of the last row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return ids, types, mask


# ----------------------------------------------------------------------------------------------
# The next-sentence head and BertForPreTraining


def test_head_is_a_linear_layer_on_the_pooled_cls_state():
    model = _perturb(build_model("bert-tiny", **SMALL, nsp_head=True))
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = model(ids, token_type_ids=types, attention_mask=mask)
        pooled = torch.tanh(out.hidden_states[:, 0] @ model.pooler.weight.T + model.pooler.bias)
        torch.testing.assert_close(out.nsp_logits, pooled @ model.nsp.weight.T + model.nsp.bias)
    assert out.nsp_logits.shape == (3, 2)
    assert build_model("bert-tiny", **SMALL)(ids).nsp_logits is None
    with pytest.raises(ConfigError, match="model.nsp_head=true needs arch=encoder with model.pooler=true"):
        ModelConfig(**{**model_preset("bert-tiny").__dict__, "pooler": False, "nsp_head": True}).validate()


def test_parameter_count_keeps_the_head_apart():
    transformers = pytest.importorskip("transformers")
    cfg = model_preset("bert-base")
    cfg.nsp_head = True
    info = model_info(cfg)
    assert info["params"] == 109_482_240  # BertModel, as without the head
    assert info["params_nsp_head"] == 768 * 2 + 2
    with torch.device("meta"):
        hf = transformers.BertForPreTraining(transformers.BertConfig())
    total = sum(p.numel() for p in hf.parameters())  # the decoder matrix is tied, counted once
    assert total == info["params"] + info["params_mlm_head"] + info["params_nsp_head"]


def _hf_pretraining(transformers, seed: int = 1):
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    return _perturb(transformers.BertForPreTraining(config), seed)


def test_import_bert_for_pretraining_gives_both_heads_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = _hf_pretraining(transformers)
    hf.save_pretrained(tmp_path)
    assert hf_folder_config(tmp_path).nsp_head  # read from the tensor names alone
    ours = import_hf(tmp_path)
    assert ours.cfg.nsp_head and ours.pooler is not None
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask)
        b = hf(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.prediction_logits, **TOL)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, **TOL)


def test_export_loads_in_bert_for_pretraining_with_both_heads_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = _perturb(build_model("bert-tiny", **SMALL, nsp_head=True))
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask)
        b = hf(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.prediction_logits, **TOL)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, **TOL)
    back = import_hf(tmp_path)  # and back
    with torch.no_grad():
        torch.testing.assert_close(back(ids, token_type_ids=types, attention_mask=mask).nsp_logits,
                                   a.nsp_logits, atol=0, rtol=0)


def test_a_next_sentence_head_without_a_pooler_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    hf = _hf_pretraining(transformers)
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in hf.state_dict().items() if "pooler" not in k},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainerError, match="cls.seq_relationship without bert.pooler"):
        import_hf(tmp_path)
