"""Masked language modelling: BERT's worked example, the 15 % / 80-10-10 statistics, dynamic but
reproducible masks, and training an encoder through the one training loop (exact resume, CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import objective
from pretrainer.config import RunConfig, TrainConfig, model_preset
from pretrainer.data.objectives import MLMBatches, MLMMasking, sample_generator
from pretrainer.data.tokens import TokenSplit
from pretrainer.model import build_model
from pretrainer.train.trainer import resume_config, train

PAD, BOS, EOS, CLS, SEP, MASK = 0, 1, 2, 4, 5, 6
SPECIALS = range(7)
V = 300


def test_worked_example_only_the_masked_position_enters_the_loss():
    # <cls> I love this red car, with "love" (position 2) the only selected position
    i_, love, this, red, car = 10, 11, 12, 13, 14
    ids = torch.tensor([CLS, i_, love, this, red, car])
    masking = MLMMasking(MASK, SPECIALS, V, mask_frac=1.0, random_frac=0.0)
    selected = torch.zeros(6, dtype=torch.bool)
    selected[2] = True
    inputs, labels = masking.corrupt(ids, selected, torch.Generator().manual_seed(0))
    assert inputs.tolist() == [CLS, i_, MASK, this, red, car]  # <cls> I <mask> this red car
    assert labels.tolist() == [-100, -100, love, -100, -100, -100]
    model = build_model("bert-tiny", vocab_size=V, n_layer=2, d_model=32, n_head=4).eval()
    out = model(inputs[None])
    expected = torch.nn.functional.cross_entropy(out.logits[0, 2:3], torch.tensor([love]))
    loss = objective("mlm", model).loss(model, {"input_ids": inputs[None], "labels": labels[None]})
    torch.testing.assert_close(loss, expected)


def test_selection_is_15_percent_and_split_80_10_10():
    masking = MLMMasking(MASK, SPECIALS, V)
    ids = torch.randint(7, V, (20_000,), generator=torch.Generator().manual_seed(0))
    ids[::50] = EOS  # specials in the stream are never candidates
    candidates = int((ids != EOS).sum())
    inputs, labels = masking(ids, torch.Generator().manual_seed(1))
    selected = labels != -100
    assert abs(selected.sum() / candidates - 0.15) < 0.01
    assert not selected[ids == EOS].any()
    n = selected.sum()
    masked = (inputs == MASK) & selected
    random = selected & (inputs != MASK) & (inputs != ids)
    kept = selected & (inputs == ids)
    assert abs(masked.sum() / n - 0.8) < 0.015
    assert abs(random.sum() / n - 0.1) < 0.015
    assert abs(kept.sum() / n - 0.1) < 0.015
    assert not torch.isin(inputs[random], torch.tensor(list(SPECIALS))).any()
    assert torch.equal(inputs[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])


def test_selection_fraction_across_many_short_draws():
    masking = MLMMasking(MASK, SPECIALS, V)
    ids = torch.randint(7, V, (30,), generator=torch.Generator().manual_seed(0))
    picked = sum(int((masking(ids, sample_generator(3, g))[1] != -100).sum()) for g in range(2000))
    assert abs(picked / (30 * 2000) - 0.15) < 0.01


def test_span_masking_selects_15_percent_in_spans():
    masking = MLMMasking(MASK, SPECIALS, V, unit="span")
    ids = torch.randint(7, V, (128,), generator=torch.Generator().manual_seed(0))
    picked = runs = 0
    for g in range(500):
        selected = masking(ids, sample_generator(0, g))[1] != -100
        picked += int(selected.sum())
        runs += int((selected[1:] & ~selected[:-1]).sum() + selected[0])
    assert abs(picked / (128 * 500) - 0.15) < 0.01
    assert picked / runs > 2.5  # geometric(0.2) clipped at 10 has mean 3.8; overlaps merge runs


def test_whole_word_masking_takes_every_piece_of_a_word():
    continues = torch.zeros(V, dtype=torch.bool)
    continues[150:] = True  # ids >= 150 continue the word before them
    masking = MLMMasking(MASK, SPECIALS, V, unit="word", continues=continues)
    gen = torch.Generator().manual_seed(0)
    picked = total = 0
    for g in range(300):
        ids = torch.randint(7, V, (128,), generator=gen)
        ids[0] = CLS
        selected = masking(ids, sample_generator(0, g))[1] != -100
        # a selected piece's word is selected whole: its neighbours within the word are too
        inside = continues[ids[1:]] & (ids[:-1] != CLS)  # a piece after <cls> starts a word
        assert torch.equal(selected[1:][inside], selected[:-1][inside])
        picked += int(selected.sum())
        total += 127
    assert abs(picked / total - 0.15) < 0.01


def test_windows_masks_are_dynamic_reproducible_and_skip_specials(synthetic_data):
    split = TokenSplit(synthetic_data, "train")
    batches = MLMBatches(split, 32, seed=7)
    x, y = batches.batch(0, 8)
    assert x.shape == y.shape == (8, 32)
    assert (x[:, 0] == CLS).all() and (x[:, -1] == SEP).all()
    x2, y2 = MLMBatches(split, 32, seed=7).batch(0, 8)  # the same samples: the same masks
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # the same window seen again (a later sample index: the next epochs) is masked differently
    start, n = batches.order.start(0), batches.order.n_windows
    labels = [batches.masked([(start, g)], seed=7)[1] for g in (0, n, 2 * n)]
    assert torch.equal(labels[0], y[:1])
    assert not torch.equal(labels[0], labels[1]) and not torch.equal(labels[1], labels[2])
    # specials (cls, sep, eos, pad) are never selected
    for g in range(0, 200, 8):
        xs, ys = batches.batch(g, 8)
        originals = torch.stack([batches.window(batches.order.start(i)) for i in range(g, g + 8)])
        special = torch.isin(originals, torch.tensor([PAD, BOS, EOS, CLS, SEP]))
        assert (ys[special] == -100).all()
        assert (ys != -100).any(dim=1).all()


def _mlm_cfg(data, out, masking="token", **train_kw) -> RunConfig:
    model = model_preset("bert-tiny")
    model.n_layer, model.d_model, model.n_head, model.vocab_size = 2, 32, 2, V
    model.dropout = 0.1  # so that exact resume also needs the RNG state
    kw = dict(max_steps=16, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=8,
              eval_batches=2, log_every=4, checkpoint_every=8, plot=False)
    kw.update(train_kw)
    return RunConfig(model=model, data=str(data), out=str(out), objective="mlm", masking=masking,
                     train=TrainConfig(**kw))


def _logged(run: Path, key: str) -> dict:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_mlm_resume_is_bit_exact(synthetic_data, tmp_path):
    # whole-word masking: the word boundaries come from the data folder's tokenizer
    train(_mlm_cfg(synthetic_data, tmp_path / "full", masking="word"), quiet=True)
    train(_mlm_cfg(synthetic_data, tmp_path / "part", masking="word"), stop_at=8, quiet=True)
    train(resume_config(tmp_path / "part"), resume=True, quiet=True)
    for key in ("loss", "val_loss", "val_accuracy"):
        a, b = _logged(tmp_path / "full", key), _logged(tmp_path / "part", key)
        assert a == b and len(a) >= 3, key


def test_cli_pretrains_bert_tiny_with_mlm(synthetic_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrainer", "pretrain", "model=bert-tiny", "objective=mlm",
           f"data={synthetic_data}", f"out={run}", "train.max_steps=20", "train.batch_size=8",
           "train.seq_len=32", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=5",
           "train.eval_every=10", "train.eval_batches=2", "train.plot=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = _logged(run, "loss")
    assert losses[20] < losses[5]
    val = _logged(run, "val_loss")
    assert val[20] < val[0]
    assert 0.0 <= _logged(run, "val_accuracy")[20] <= 1.0
    done = subprocess.run([sys.executable, "-m", "pretrainer", "evaluate", str(run), "--max-batches",
                           "2", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout)
    assert scores["val_loss"] == _logged(run, "val_loss")[20]  # the same windows and masks
    assert scores["val_accuracy"] == _logged(run, "val_accuracy")[20]


def test_mask_prob_sets_the_share_selected_through_the_config(synthetic_data):
    from pretrainer.errors import ConfigError
    from pretrainer.train.objectives import get_objective

    split = TokenSplit(synthetic_data, "train")
    shares = {}
    for p in (0.15, 0.4):
        cfg = RunConfig(model=model_preset("bert-tiny"), objective="mlm", mask_prob=p)
        batches = get_objective(cfg).builder(split, 64, 3)
        picked = candidates = 0
        for g in range(0, 256, 16):
            x, y = batches.batch(g, 16)
            picked += int((y != -100).sum())
            originals = torch.stack([batches.window(batches.order.start(i)) for i in range(g, g + 16)])
            candidates += int((~torch.isin(originals, torch.tensor([PAD, BOS, EOS, CLS, SEP]))).sum())
        shares[p] = picked / candidates
    assert abs(shares[0.15] - 0.15) < 0.01 and abs(shares[0.4] - 0.4) < 0.01
    with pytest.raises(ConfigError, match="mask_prob=0.4 applies to objective=mlm"):
        get_objective(RunConfig(objective="clm", mask_prob=0.4))
    with pytest.raises(ConfigError, match="mask_prob=1.5: expected a share between 0 and 1"):
        RunConfig(model=model_preset("bert-tiny"), objective="mlm", mask_prob=1.5).validate(need_paths=False)
