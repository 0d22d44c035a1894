"""DistilBERT (Sanh et al. 2019) and knowledge distillation.

- ``distilbert-base`` counts what ``DistilBertModel`` counts, and converts both ways with
  ``DistilBertForMaskedLM`` to float32 rounding (models built locally from random weights, every
  parameter perturbed);
- ``pretrainer finetune`` starts from an imported DistilBERT folder and from a run of the CPU preset;
- ``pretrainer distill``: the loss is Sanh et al.'s, term by term, computed by hand here; the student
  starts from every other teacher layer; a distill run resumes bit-exact; encoders and decoders;
  a teacher with another tokenizer is refused in one line.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from pretrainer.config import model_preset
from pretrainer.errors import PretrainerError
from pretrainer.interop.hf import config_from_hf, export_hf, hf_family, import_hf
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
    """ids and an attention mask with padding after position 15 of the second row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return ids, mask


def _hf_distilbert(seed: int = 1, vocab_size: int = V, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=96,
                                           max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    return _perturb(transformers.DistilBertForMaskedLM(config), seed)


# ----------------------------------------------------------------------------------------------
# The preset and Hugging Face parity


def test_distilbert_base_has_distilbertmodels_parameter_count():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.DistilBertModel(transformers.DistilBertConfig())
    expected = sum(p.numel() for p in hf.parameters())
    assert expected == 66_362_880
    cfg = model_preset("distilbert-base")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.type_vocab_size, cfg.pooler) == (6, 768, 12, 0, False)
    assert model_info(cfg)["params"] == expected
    assert hf_family(cfg) == "distilbert"
    # the CPU size: bert-mini with half its layers
    mini, teacher = model_preset("distilbert-mini"), model_preset("bert-mini")
    assert (mini.n_layer * 2, mini.d_model, mini.n_head) == (teacher.n_layer, teacher.d_model, teacher.n_head)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_import_distilbert_for_masked_lm_gives_same_logits(tmp_path, act):
    hf = _hf_distilbert(activation=act)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert isinstance(ours, EncoderLM) and ours.pooler is None and ours.type_emb is None
    assert ours.cfg.norm_eps == 1e-12
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   hf(ids, attention_mask=mask).logits, **TOL)


def test_export_loads_in_distilbert_for_masked_lm_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _perturb(build_model("distilbert-mini", **SMALL))
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == ["DistilBertForMaskedLM"]
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(hf, transformers.DistilBertForMaskedLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits,
                                   **TOL)
        base = transformers.DistilBertModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(ours(ids, attention_mask=mask).hidden_states,
                                   base(ids, attention_mask=mask).last_hidden_state, **TOL)
    # and back: the exported folder imports to the same weights
    again = import_hf(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_what_distilbert_cannot_hold_is_refused():
    cfg = model_preset("distilbert-mini")
    cfg.vocab_size = V
    for field, value, needle in (("pooler", True, "model.pooler=True"), ("norm_eps", 1e-5, "model.norm_eps=1e-05"),
                                 ("prenorm", True, "model.prenorm=True")):
        bad = model_preset("distilbert-mini")
        setattr(bad, field, value)
        with pytest.raises(PretrainerError, match=needle.replace(".", r"\.")):
            hf_family(bad)
    base = dict(model_type="distilbert", vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=96)
    with pytest.raises(PretrainerError, match="sinusoidal_pos_embds=True has no pretrainer equivalent"):
        config_from_hf(dict(base, sinusoidal_pos_embds=True))
    with pytest.raises(PretrainerError, match="activation='swish' has no pretrainer equivalent"):
        config_from_hf(dict(base, activation="swish"))
    assert config_from_hf(base).type_vocab_size == 0


# ----------------------------------------------------------------------------------------------
# Fine-tuning from DistilBERT folders and runs

POS = "good great fine lovely superb nice".split()
NEG = "bad awful poor terrible dull ugly".split()
FILLER = "the movie was quite really a plot and acting story film".split()


def _sentiment(path, n, seed):
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        lines.append(f"{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n")
    return path


FT = dict(epochs=1, batch_size=16, lr=1e-3, max_len=16, quiet=True)


def test_finetune_from_an_imported_distilbert_folder(tmp_path):
    from pretrainer.finetune import finetune
    from pretrainer.interop.hf import import_run
    from pretrainer.tokenization import Tok

    train, dev = _sentiment(tmp_path / "train.tsv", 96, 0), _sentiment(tmp_path / "dev.tsv", 32, 1)
    tok = Tok.train([line for line in train.read_text().splitlines()] * 2, "wordpiece", 120)
    hf = _hf_distilbert(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    r = finetune(str(tmp_path / "hf"), "classification", str(train), str(tmp_path / "ft-hf"), str(dev), **FT)
    assert 0.0 <= r["accuracy"] <= 1.0
    import_run(tmp_path / "hf", tmp_path / "run")  # pretrainer import, then fine-tune the run
    r = finetune(str(tmp_path / "run"), "classification", str(train), str(tmp_path / "ft-run"), str(dev), **FT)
    assert 0.0 <= r["accuracy"] <= 1.0
