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
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 300
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=V, max_seq_len=64, n_layer=2, d_model=32, n_head=4)


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


# ----------------------------------------------------------------------------------------------
# Distillation


def test_student_layers_are_one_in_two_from_first_to_last():
    from pretrainer.train.distill import student_layers

    assert student_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # what the released DistilBERT took from BERT-base
    assert student_layers(4, 2) == [0, 3]
    assert student_layers(6, 6) == list(range(6))
    assert student_layers(6, 1) == [0]
    assert student_layers(2, 4) == []


def _distill_objective(teacher, student, **distill):
    """The distill objective for ``student`` with the in-memory ``teacher`` (no folder read)."""
    from pretrainer.config import DistillConfig, RunConfig
    from pretrainer.train.objectives import Distill

    cfg = RunConfig(model=student.cfg, objective="distill", distill=DistillConfig(teacher="mem", **distill))
    obj = Distill(cfg)
    obj._teacher, obj.cosine = teacher.eval(), teacher.cfg.d_model == student.cfg.d_model
    return obj


@pytest.mark.parametrize("masked_only", [False, True])
def test_encoder_distill_loss_is_sanh_et_al_term_by_term(masked_only):
    """Against DistilBERT's loss written with torch.nn's KLDivLoss (batchmean, x T^2),
    CrossEntropyLoss on the masked tokens and CosineEmbeddingLoss (target 1) on every token."""
    torch.manual_seed(0)
    teacher = _perturb(build_model("bert-tiny", **dict(SMALL, n_layer=4)), seed=1)
    student = _perturb(build_model("distilbert-mini", **SMALL), seed=2)
    ids, _ = _inputs(length=24)
    labels = torch.full_like(ids, -100)
    labels[0, [2, 5, 9]], labels[1, [1, 20]] = ids[0, [2, 5, 9]], ids[1, [1, 20]]
    obj = _distill_objective(teacher, student, masked_only=masked_only, temperature=3.0, ce_weight=0.5,
                             lm_weight=0.25, cos_weight=2.0)
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        zt, ht = teacher(ids).logits, teacher(ids).hidden_states
        zs, hs = student(ids).logits, student(ids).hidden_states
    sel = (labels != -100) if masked_only else torch.ones_like(ids, dtype=torch.bool)
    T = 3.0
    ce = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(zs[sel] / T, -1),
                                                    torch.softmax(zt[sel] / T, -1)) * T ** 2
    mlm = torch.nn.CrossEntropyLoss()(zs[labels != -100], labels[labels != -100])
    flat_s, flat_t = hs.reshape(-1, 32), ht.reshape(-1, 32)
    cos = torch.nn.CosineEmbeddingLoss()(flat_s, flat_t, torch.ones(len(flat_s)))
    terms = obj.terms(student, batch)
    torch.testing.assert_close(terms["ce"], ce, **TOL)
    torch.testing.assert_close(terms["lm"], mlm, **TOL)
    torch.testing.assert_close(terms["cos"], cos, **TOL)
    torch.testing.assert_close(obj.loss(student, batch), 0.5 * ce + 0.25 * mlm + 2.0 * cos, **TOL)
    assert obj.count(batch) == sel.sum()
    # a student that is the teacher: no soft-target or cosine loss left
    same = _distill_objective(teacher, teacher).terms(teacher, batch)
    assert abs(float(same["ce"].detach())) < 1e-6 and abs(float(same["cos"].detach())) < 1e-6


def test_decoder_distill_loss_uses_next_token_distributions():
    torch.manual_seed(0)
    teacher = _perturb(build_model("gpt-micro", n_layer=4, d_model=32, n_head=4, vocab_size=V, max_seq_len=64), 1)
    student = _perturb(build_model("gpt-micro", n_layer=2, d_model=16, n_head=4, vocab_size=V, max_seq_len=64), 2)
    ids, _ = _inputs(length=24)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    obj = _distill_objective(teacher, student)  # DistilBERT's 5 / 2 / 1 at T=2
    assert obj.cosine is False  # widths 16 and 32: no cosine term
    with torch.no_grad():
        zt, zs = teacher(batch["input_ids"]).logits, student(batch["input_ids"]).logits
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1),
                                    log_target=True, reduction="none").sum(-1).mean() * 4
    clm = torch.nn.functional.cross_entropy(zs.reshape(-1, V), batch["labels"].reshape(-1))
    terms = obj.terms(student, batch)
    assert set(terms) == {"ce", "lm"}
    torch.testing.assert_close(obj.loss(student, batch), 5 * kl + 2 * clm, **TOL)


def test_student_starts_from_the_teacher_layers_and_segment_row():
    """A 4-layer BERT teacher, a 2-layer DistilBERT student: blocks 0 and 1 are the teacher's 0 and
    3, and with the segment-0 row folded into the positions the embeddings are the teacher's."""
    from pretrainer.train.distill import init_student

    teacher = _perturb(build_model("bert-tiny", **dict(SMALL, n_layer=4)), seed=1)
    student = build_model("distilbert-mini", **SMALL)
    note = init_student(student, teacher)
    assert note.startswith("student layers 0, 1 from teacher layers 0, 3")
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["blocks.1.attn.qkv.weight"], t["blocks.3.attn.qkv.weight"])
    assert torch.equal(s["blocks.0.mlp.up.weight"], t["blocks.0.mlp.up.weight"])
    assert torch.equal(s["mlm.out.weight"], t["tok_emb.weight"]) and torch.equal(s["mlm.dense.weight"], t["mlm.dense.weight"])
    # the same depth: the student is the teacher, segment embeddings gone
    same = build_model("distilbert-mini", **dict(SMALL, n_layer=4))
    init_student(same, teacher)
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(ids, attention_mask=mask).logits,
                                   teacher(ids, attention_mask=mask).logits, **TOL)
    # a shorter context: the first rows of the teacher's positions (plus its segment-0 row)
    short = build_model("distilbert-mini", **dict(SMALL, max_seq_len=32))
    assert "positions: the first 32 of 32 rows" in init_student(short, teacher)
    torch.testing.assert_close(short.pos_emb.weight, t["pos_emb.weight"][:32] + t["type_emb.weight"][0])
    # other widths: nothing fits but the output bias, said so
    wide = build_model("distilbert-mini", **dict(SMALL, d_model=64))
    assert "no student layer from the teacher" in init_student(wide, teacher)


@pytest.fixture(scope="module")
def teachers(synthetic_data, tmp_path_factory):
    """An encoder (4 x 32) and a decoder (4 x 32) teacher, each pretrained 20 steps."""
    from pretrainer.config import load_config
    from pretrainer.train.trainer import train

    root = tmp_path_factory.mktemp("teachers")
    common = [f"data={synthetic_data}", "model.n_layer=4", "model.d_model=32", "model.n_head=4",
              "model.max_seq_len=64", "train.max_steps=20", "train.batch_size=8", "train.seq_len=32",
              "train.eval_every=20", "train.plot=false"]
    train(load_config(None, ["model=bert-mini", "model.vocab_size=null", "objective=mlm",
                             f"out={root / 'bert'}", *common]), quiet=True)
    train(load_config(None, ["model=gpt-micro", f"out={root / 'gpt'}", *common]), quiet=True)
    return root / "bert", root / "gpt"


def _distill_cli(capsys, *args):
    from pretrainer.cli import main

    code = main(["distill", *args])
    out, err = capsys.readouterr()
    return code, out, err


SHORT = ["train.max_steps=12", "train.log_every=3", "train.eval_every=6", "train.checkpoint_every=6",
         "train.warmup_steps=2", "train.plot=false"]


def _logged(run, key="loss"):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_distill_runs_through_the_training_loop_and_resumes_exactly(teachers, tmp_path, capsys, kind):
    """The default student (the teacher with half its layers, dropout on so that resuming needs
    the random streams) through the CLI, then the same run stopped at step 6 and resumed with
    --resume: every logged loss equals, bit for bit."""
    from pretrainer.train.distill import distill_config
    from pretrainer.train.trainer import train

    teacher = teachers[0] if kind == "encoder" else teachers[1]
    code, _, err = _distill_cli(capsys, str(teacher), f"out={tmp_path / 'full'}", "model.dropout=0.1", *SHORT)
    assert code == 0, err
    first = err.strip().splitlines()[0]
    assert "objective distill" in first and "student layers 0, 1 from teacher layers 0, 3" in first, first
    assert "weights ce 5 / " + ("mlm" if kind == "encoder" else "clm") + " 2 / cos 1" in first
    cfg = distill_config(str(teacher), overrides=[f"out={tmp_path / 'part'}", "model.dropout=0.1", *SHORT])
    train(cfg, stop_at=6, quiet=True)
    code, _, err = _distill_cli(capsys, "--resume", str(tmp_path / "part"))
    assert code == 0, err
    full, part = _logged(tmp_path / "full"), _logged(tmp_path / "part")
    assert sorted(full) == [3, 6, 9, 12] and full == part
    assert _logged(tmp_path / "full", "val_loss") == _logged(tmp_path / "part", "val_loss")
    import yaml

    saved = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert saved["objective"] == "distill" and saved["model"]["n_layer"] == 2
    assert saved["distill"]["teacher"] == str(teacher) and saved["model"]["arch"] == kind


def test_distill_refuses_another_tokenizer_or_vocabulary_in_one_line(teachers, tmp_path, capsys):
    from pretrainer.data.prepare import prepare

    other = tmp_path / "other"
    prepare("builtin:synthetic", "bpe:280", other, progress=False)
    for args, needle in (([f"data={other}"], "another tokenizer"),
                         (["model.vocab_size=400"], "teacher and student must share the vocabulary"),
                         (["model.arch=decoder", "model.type_vocab_size=0", "model.pooler=false"], "arch=encoder")):
        code, _, err = _distill_cli(capsys, str(teachers[0]), f"out={tmp_path / 'x'}", *args, *SHORT)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "x").exists()


def test_distill_settings_are_checked():
    from pretrainer.config import load_config
    from pretrainer.errors import ConfigError

    for overrides, needle in ((["model=bert-tiny", "objective=distill"], "distill.teacher is missing"),
                              (["model=bert-tiny", "distill.teacher=t"], "applies to objective=distill only"),
                              (["model=gpt-nano", "objective=distill", "distill.teacher=t", "distill.masked_only=true"],
                               "masked_only applies to encoders"),
                              (["model=bert-tiny", "objective=distill", "distill.teacher=t", "distill.temperature=0"],
                               "distill.temperature=0.0: expected a positive"),
                              (["model=t5-tiny", "objective=distill", "distill.teacher=t"], "trains arch=encoder or decoder")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, overrides).validate(need_paths=False)


def test_finetune_from_a_distilled_cpu_preset_run(teachers, tmp_path, capsys):
    """distilbert-mini (at the teacher's width) distilled from the BERT teacher, then fine-tuned."""
    from pretrainer.finetune import finetune

    code, _, err = _distill_cli(capsys, str(teachers[0]), "--student", "distilbert-mini", "model.d_model=32",
                                "model.n_head=4", "model.max_seq_len=64", f"out={tmp_path / 'student'}", *SHORT)
    assert code == 0, err
    assert "student layers 0, 1 from teacher layers 0, 3" in err.splitlines()[0]
    train, dev = _sentiment(tmp_path / "train.tsv", 96, 0), _sentiment(tmp_path / "dev.tsv", 32, 1)
    r = finetune(str(tmp_path / "student"), "classification", str(train), str(tmp_path / "ft"), str(dev), **FT)
    assert 0.0 <= r["accuracy"] <= 1.0
