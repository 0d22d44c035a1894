"""RoBERTa (Liu et al. 2019): the presets' sizes against ``RobertaModel``, positions offset as
RoBERTa's, parity with Hugging Face ``RobertaForMaskedLM`` / ``RobertaModel`` in both directions
(models built locally from random weights, every parameter perturbed), refusals, and fine-tuning
from an imported RoBERTa folder and from a roberta-tiny run. Also the bart-tiny preset."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from pretrainer.config import ModelConfig, load_config, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.interop.hf import config_from_hf, export_hf, hf_family, import_hf, to_hf_state_dict
from pretrainer.model import EncoderLM, build_model
from pretrainer.model.info import model_info
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 300
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=V, max_seq_len=64, n_layer=2, d_model=32, n_head=4)


def _inputs(pad: int, batch: int = 2, length: int = 20, seed: int = 1):
    """ids that never hold ``pad`` except as right padding (after position 15 of the last row)."""
    ids = torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[ids == pad] = pad + 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    ids[-1, 15:] = pad
    return ids, mask


def _hf_config(transformers, pad: int = 1, **kw):
    fields = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64 + pad + 1, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=pad,
                  bos_token_id=0, eos_token_id=2)
    return transformers.RobertaConfig(**{**fields, **kw})


def _same(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal at the real tokens (a padding position's state is meaningless in both models)."""
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], **TOL)


# ----------------------------------------------------------------------------------------------
# Presets and positions


def test_roberta_base_has_robertamodels_parameter_count(capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                        layer_norm_eps=1e-5)  # roberta-base's config.json
    with torch.device("meta"):
        hf = transformers.RobertaModel(config)
    expected = sum(p.numel() for p in hf.parameters())
    assert expected == 124_645_632
    info = model_info(model_preset("roberta-base"))
    assert info["params"] == expected
    assert info["params_mlm_head"] == 768 * 768 + 768 + 2 * 768 + 50265  # transform, norm, bias (tied)
    from pretrainer.cli import main

    assert main(["info", "roberta-base", "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["params"] == 124_645_632
    cfg = model_preset("roberta-base")
    assert (cfg.position_offset, cfg.max_seq_len, cfg.type_vocab_size, cfg.norm_eps) == (2, 512, 1, 1e-5)
    assert hf_family(cfg) == "roberta"


def test_small_presets():
    tiny = build_model("roberta-tiny", vocab_size=V)
    assert isinstance(tiny, EncoderLM) and tiny.pos_emb.weight.shape == (512 + 2, 256)
    assert tiny.type_emb.weight.shape == (1, 256)
    bart = model_preset("bart-tiny")
    base = model_preset("bart-base")
    # the same architecture as bart-base (learned positions, post-norm, embedding norm), at a CPU size
    same = ("arch", "position", "norm", "prenorm", "mlp", "bias", "embed_norm", "tie_embeddings", "norm_eps")
    assert all(getattr(bart, k) == getattr(base, k) for k in same)
    assert (bart.n_layer, bart.d_model, bart.n_head, bart.ff_dim, bart.vocab_size) == (4, 256, 4, 1024, None)
    assert hf_family(dataclasses.replace(bart, vocab_size=V)) == "bart"  # it converts as BART


def test_positions_start_at_the_offset():
    """Position i reads row offset + i: the rows in front change nothing, and the model equals a
    BERT-layout model whose table is the rows from the offset on."""
    torch.manual_seed(0)
    roberta = _perturb(build_model("roberta-tiny", **SMALL))
    ids, mask = _inputs(pad=0)
    with torch.no_grad():
        before = roberta(ids, attention_mask=mask).logits
        roberta.pos_emb.weight[:2] = 100.0  # rows no input reaches
        after = roberta(ids, attention_mask=mask).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    bert = build_model("roberta-tiny", **SMALL, position_offset=0).eval()
    state = roberta.state_dict()
    state["pos_emb.weight"] = state["pos_emb.weight"][2:]
    bert.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(bert(ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):
        roberta(torch.zeros(1, 65, dtype=torch.long))


def test_position_offset_is_validated():
    with pytest.raises(ConfigError, match="model.position_offset=2 applies to position=learned only"):
        ModelConfig(position="rope", position_offset=2).validate()
    with pytest.raises(ConfigError, match="model.position_offset=-1: expected an integer >= 0"):
        load_config(None, ["model=roberta-tiny", "model.position_offset=-1"]).model.validate()


# ----------------------------------------------------------------------------------------------
# Hugging Face parity, both directions


def test_import_roberta_for_masked_lm_gives_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = _perturb(transformers.RobertaForMaskedLM(_hf_config(transformers)), 1)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert isinstance(ours, EncoderLM) and ours.pooler is None  # RobertaForMaskedLM has none
    assert (ours.cfg.position_offset, ours.cfg.max_seq_len, ours.cfg.type_vocab_size) == (2, 64, 1)
    assert ours.pos_emb.weight.shape[0] == 66  # every row of Hugging Face's table
    ids, mask = _inputs(pad=1)
    with torch.no_grad():
        _same(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask)
        # a model sized to max_seq_len: the longest input reads the table's last row
        full = torch.randint(3, V, (1, 64), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours(full).logits, hf(full).logits, **TOL)


def test_import_roberta_model_with_pooler_and_two_segment_types(tmp_path):
    """A RoBERTa checkpoint that holds the pooler (and, as some do, two token-type rows)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = _hf_config(transformers, type_vocab_size=2)
    hf = _perturb(transformers.RobertaForMaskedLM(config), 2)
    base = _perturb(transformers.RobertaModel(config), 3)  # the backbone with a pooler
    weights = {f"roberta.{k}": v for k, v in base.state_dict().items()}
    weights.update({k: v for k, v in hf.state_dict().items() if k.startswith("lm_head.")})
    hf.roberta.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")})
    save_file({k: v.clone() for k, v in weights.items() if "position_ids" not in k},  # tied copies too
              str(tmp_path / "model.safetensors"))
    config.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.pooler is not None and ours.cfg.type_vocab_size == 2
    ids, mask = _inputs(pad=1)
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, token_type_ids=types)
        ref = base(ids, attention_mask=mask, token_type_ids=types)
        _same(out.hidden_states, ref.last_hidden_state, mask)
        torch.testing.assert_close(ours.pooled(out.hidden_states), ref.pooler_output, **TOL)
        _same(out.logits, hf(ids, attention_mask=mask, token_type_ids=types).logits, mask)


def test_export_loads_in_roberta_for_masked_lm_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = _perturb(build_model("roberta-tiny", **SMALL))
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["architectures"] == ["RobertaForMaskedLM"]
    # without a tokenizer the padding id is 0: positions start at row 1 of a 65-row table
    assert (config["pad_token_id"], config["max_position_embeddings"]) == (0, 65)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == "RobertaForMaskedLM" and not info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"roberta.pooler.dense.weight", "roberta.pooler.dense.bias"}
    hf.eval()
    ids, mask = _inputs(pad=0)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        _same(out.logits, hf(ids, attention_mask=mask).logits, mask)
        base = transformers.RobertaModel.from_pretrained(tmp_path).eval()  # backbone and pooler
        ref = base(ids, attention_mask=mask)
        _same(out.hidden_states, ref.last_hidden_state, mask)
        torch.testing.assert_close(ours.pooled(out.hidden_states), ref.pooler_output, **TOL)
    # and back: the same logits, the positions now counted from pad_token_id + 1 = 1
    back = import_hf(tmp_path)
    assert (back.cfg.position_offset, back.cfg.max_seq_len) == (1, 64)
    with torch.no_grad():
        _same(back(ids, attention_mask=mask).logits, out.logits, mask)


@pytest.mark.parametrize("pad", [0, 1, 5])
def test_export_shifts_positions_to_the_padding_id(tmp_path, pad):
    """Hugging Face reads row pad + 1 + i: our leading rows are dropped (pad 0), kept (pad 1) or
    zero rows are put in front (pad 5), and the logits stay the same."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    ours = _perturb(build_model("roberta-tiny", **SMALL))
    config, weights = to_hf_state_dict(ours, pad_token_id=pad)
    assert config["pad_token_id"] == pad and config["max_position_embeddings"] == 64 + pad + 1
    table = weights["roberta.embeddings.position_embeddings.weight"]
    torch.testing.assert_close(table[pad + 1:], ours.pos_emb.weight[2:].detach(), atol=0, rtol=0)
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.RobertaForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = _inputs(pad=pad)
    with torch.no_grad():
        _same(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask)


def test_export_with_a_tokenizer_takes_its_padding_id(tmp_path, synthetic_data):
    transformers = pytest.importorskip("transformers")
    from pretrainer.tokenization import load_tokenizer

    tok = load_tokenizer(synthetic_data / "tokenizer")
    torch.manual_seed(4)
    ours = _perturb(build_model("roberta-tiny", **{**SMALL, "vocab_size": tok.vocab_size}))
    export_hf(ours, tmp_path, tokenizer_dir=synthetic_data / "tokenizer")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pad_token_id"] == tok.role_id("pad") == 0
    hf = transformers.RobertaForMaskedLM.from_pretrained(tmp_path).eval()
    enc = transformers.AutoTokenizer.from_pretrained(tmp_path)(["def f(x): return x", "a longer text, padded"],
                                                              padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert not mask.all()  # one row is padded with the tokenizer's pad id
    with torch.no_grad():
        _same(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask)


def test_what_cannot_convert_is_refused(tmp_path):
    gpt = model_preset("gpt-micro")
    gpt.vocab_size, gpt.position_offset = V, 2
    with pytest.raises(PretrainerError, match="model.position_offset=2 has no Hugging Face equivalent"):
        hf_family(gpt)
    relu = model_preset("roberta-base")
    relu.mlp = "relu"
    with pytest.raises(PretrainerError, match="model.mlp='relu' has no Hugging Face equivalent.*GELU"):
        hf_family(relu)
    nsp = model_preset("roberta-base")
    nsp.nsp_head = True
    with pytest.raises(PretrainerError, match="model.nsp_head=True has no Hugging Face equivalent"):
        hf_family(nsp)
    base = dict(model_type="roberta", vocab_size=V, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=64, max_position_embeddings=66)
    with pytest.raises(PretrainerError, match="hidden_act='relu' has no pretrainer equivalent"):
        config_from_hf({**base, "pad_token_id": 1, "hidden_act": "relu"})
    with pytest.raises(PretrainerError, match="missing field 'pad_token_id'"):
        config_from_hf(base)
    with pytest.raises(PretrainerError, match="max_position_embeddings=2 leaves no position"):
        config_from_hf({**base, "pad_token_id": 1, "max_position_embeddings": 2})
    with pytest.raises(PretrainerError, match="position_embedding_type='relative_key'"):
        config_from_hf({**base, "pad_token_id": 1, "position_embedding_type": "relative_key"})
    # a tokenizer without a padding token (GPT-2's names only its end-of-text token) cannot place them
    from pretrainer.tokenization import Tok

    Tok.train(["some words for a small vocabulary"] * 3, "bpe", 40).save(tmp_path / "tok")
    (tmp_path / "tok" / "special_tokens_map.json").unlink(missing_ok=True)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(PretrainerError, match="no padding token, from which a RoBERTa counts its positions"):
        export_hf(build_model("roberta-tiny", **SMALL), tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Training and fine-tuning


def _sentiment(path, n: int, seed: int):
    import random

    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice("the movie was a plot and story".split()) for _ in range(4)]
        words.insert(rng.randint(0, 4), rng.choice(("good great fine" if y else "bad awful poor").split()))
        lines.append(f"{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_from_a_roberta_tiny_run_and_an_imported_folder(tmp_path, synthetic_data):
    transformers = pytest.importorskip("transformers")
    from pretrainer.finetune import finetune
    from pretrainer.tokenization import load_tokenizer
    from pretrainer.train.trainer import train

    train_file, dev = _sentiment(tmp_path / "train.tsv", 64, 0), _sentiment(tmp_path / "dev.tsv", 16, 1)
    cfg = load_config(None, ["model=roberta-tiny", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                             "model.max_seq_len=64", "objective=mlm", f"data={synthetic_data}",
                             f"out={tmp_path / 'pre'}", "train.max_steps=3", "train.batch_size=4",
                             "train.seq_len=32", "train.eval_every=0", "train.plot=false"])
    train(cfg, quiet=True)
    r = finetune(str(tmp_path / "pre"), "classification", str(train_file), str(tmp_path / "ft-run"),
                 eval=str(dev), epochs=1, batch_size=16, max_len=32, quiet=True)
    assert 0.0 <= r["accuracy"] <= 1.0
    # a RobertaForMaskedLM folder saved by transformers, with a tokenizer
    tok = load_tokenizer(synthetic_data / "tokenizer")
    torch.manual_seed(5)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=0))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    r = finetune(str(tmp_path / "hf"), "classification", str(train_file), str(tmp_path / "ft-hf"),
                 eval=str(dev), epochs=1, batch_size=16, max_len=32, quiet=True)
    assert 0.0 <= r["accuracy"] <= 1.0


def test_init_from_a_roberta_for_masked_lm_folder(tmp_path, synthetic_data):
    """Continued pretraining from a RobertaForMaskedLM folder (which has no pooler)."""
    transformers = pytest.importorskip("transformers")
    from pretrainer.train.trainer import train

    torch.manual_seed(6)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1))
    hf.save_pretrained(tmp_path / "hf")
    cfg = load_config(None, [f"init_from={tmp_path / 'hf'}", "objective=mlm", f"data={synthetic_data}",
                             f"out={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                             "train.seq_len=32", "train.eval_every=0", "train.plot=false"])
    out = train(cfg, quiet=True)
    assert out["step"] == 2
    saved = load_config(str(tmp_path / "run" / "config.yaml")).model
    assert saved.position_offset == 2 and not saved.pooler
