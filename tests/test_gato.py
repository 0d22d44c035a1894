"""Gato-style serialisation (issue 18): text, image patches and mu-law discretised values in one
stream for one decoder (Reed et al. 2022).

References: Gato's mu-law companding and 1,024 bins, worked by hand for a few values; the token
layout of a fixed caption example and a fixed control step, written out position by position; the
trainer's exact resume.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pretrainer.common import IGNORE
from pretrainer.config import load_config, model_preset
from pretrainer.data.gato import (BINS, PAD, PATCH, SEPARATOR, TASKS, TEXT, VALUE, GatoBatches, Layout, Stream,
                                  discretise, image_patches, mu_law, pendulum, put_caption, put_control,
                                  undiscretise)
from pretrainer.errors import ConfigError


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from pretrainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "text"
    prepare("builtin:stdlib:20", "char", out, progress=False)
    return out


# ----------------------------------------------------------------------------------------------
# Continuous values as tokens


def test_mu_law_bins_by_hand():
    # bin = floor((sgn(x) ln(1 + 100 |x|) / ln(1 + 256 * 100) + 1) * 512), clipped to [0, 1023]
    x = torch.tensor([0.0, 0.5, 1.0, -1.0, -0.5, 0.25, 256.0, 1e4, -1e4])
    assert discretise(x).tolist() == [512, 710, 744, 279, 313, 676, 1023, 1023, 0]


def test_mu_law_round_trips_within_one_bin():
    g = torch.Generator().manual_seed(0)
    up = torch.logspace(-5, math.log10(256), 20000, dtype=torch.float64)
    x = torch.cat([-up.flip(0), torch.zeros(1, dtype=torch.float64), up,
                   (torch.rand(5000, generator=g, dtype=torch.float64) - 0.5) * 512])
    bins = discretise(x)
    back = undiscretise(bins)
    assert torch.equal(discretise(back), bins)  # a bin's middle is in the bin
    assert (mu_law(back) - mu_law(x)).abs().max() <= 1.0 / BINS + 1e-12  # half a bin's width (2 / 1024)
    assert (bins[1:40001] >= bins[:40000]).all()  # monotone
    every = torch.arange(BINS)
    assert torch.equal(discretise(undiscretise(every)), every)  # each of the 1024 bins, and back
    assert len(torch.unique(bins[:40001])) == BINS  # [-M, M] reaches every bin
    # in the values' own units: x and the middle of its bin both lie between the bin's edges
    from pretrainer.data.gato import inverse_mu_law

    lo, hi = inverse_mu_law(bins / (BINS / 2) - 1.0), inverse_mu_law((bins + 1) / (BINS / 2) - 1.0)
    assert ((lo <= x + 1e-12) & (x <= hi + 1e-12) & (lo < back) & (back < hi)).all()
    assert ((back - x).abs() <= hi - lo).all()


# ----------------------------------------------------------------------------------------------
# The stream's layout


def test_caption_example_layout():
    V, eos, pad = 10, 2, 0
    layout = Layout(V)
    assert (layout.sep, layout.patch) == (V + 1024, V + 1025)
    image = np.zeros((1, 8, 8), np.uint8)
    image[0, :4, 4:] = 255  # the second patch (top right) white
    s = Stream(13, patch_dim=16, pad=pad)
    put_caption(s, image, [5, 6, 7, eos], layout, patch_size=4, example=0)
    P, S = layout.patch, layout.sep
    assert s.ids.tolist() == [P, P, P, P, S, 5, 6, 7, eos, pad, pad, pad, pad]
    assert s.types.tolist() == [PATCH] * 4 + [SEPARATOR] + [TEXT] * 4 + [PAD] * 4
    assert s.target.tolist() == [False] * 5 + [True] * 4 + [False] * 4  # the caption and its end only
    t = s.tensors()
    assert t["input_ids"].tolist() == s.ids[:-1].tolist()
    # position i predicts token i + 1: the separator predicts the caption's first token
    assert t["labels"].tolist() == [IGNORE] * 4 + [5, 6, 7, eos] + [IGNORE] * 4
    assert t["patch_index"].tolist() == [0, 1, 2, 3] + [-1] * 8
    # Gato's patch normalisation: pixels in [-1, 1], divided by sqrt(patch size)
    assert torch.equal(t["patches"][1], torch.full((16,), 0.5)) and torch.equal(t["patches"][0], torch.full((16,), -0.5))
    assert t["patches"][4:].abs().sum() == 0
    assert t["example"].tolist() == [-1] * 4 + [0] * 4 + [-1] * 4


def test_control_example_layout():
    V = 10
    layout = Layout(V)
    s = Stream(9, patch_dim=16, pad=0)
    put_control(s, np.array([0.0, 0.5]), np.array([1.0, -1.0]), np.array([-0.5, 0.25]), layout)
    S = layout.sep
    # per step: angle, angular velocity, "|", torque (bins by hand: test_mu_law_bins_by_hand)
    assert s.ids.tolist() == [V + 512, V + 744, S, V + 313, V + 710, V + 279, S, V + 676, 0]
    assert s.types.tolist() == [VALUE, VALUE, SEPARATOR, VALUE] * 2 + [PAD]
    assert s.target.tolist() == [False, False, False, True] * 2 + [False]  # the actions only
    t = s.tensors()
    assert t["labels"].tolist() == [IGNORE, IGNORE, V + 313, IGNORE, IGNORE, IGNORE, V + 676, IGNORE]
    assert t["target_values"].tolist() == [0, 0, -0.5, 0, 0, 0, 0.25, 0]
    assert t["example"].tolist() == [-1, -1, 0, -1, -1, -1, 1, -1]
    assert (t["patch_index"] == -1).all()


def test_pendulum_is_deterministic_and_controlled():
    a, b = pendulum(2000, seed=3, episode=7), pendulum(2000, seed=3, episode=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], pendulum(2000, seed=3, episode=8)[0])
    assert not np.array_equal(a[0], pendulum(2000, seed=3, episode=7, split_tag=1)[0])
    theta, omega, u = a
    assert np.allclose(u, np.clip(-1.0 * theta - 0.3 * omega, -2, 2))  # the PD controller's torque
    # semi-implicit Euler at 0.01 s: the velocity first, then the angle with the new velocity
    assert np.allclose(omega[1:], omega[:-1] + 0.01 * (-9.81 * np.sin(theta[:-1]) - 0.1 * omega[:-1] + u[:-1]))
    assert np.allclose(theta[1:], theta[:-1] + 0.01 * omega[1:])
    assert np.abs(theta[-200:]).max() < 0.1 * np.abs(theta[:200]).max()  # brought towards rest in 20 s


def test_batches_mix_the_tasks_and_are_a_pure_function_of_the_sample(text):
    from pretrainer.data.tokens import TokenSplit

    split = TokenSplit(text, "train")
    b = GatoBatches(split, 64, seed=5, tasks=TASKS, patch_size=4)
    batch = b.batch(3, 6)
    assert batch["task"].tolist() == [0, 1, 2, 0, 1, 2]  # rows go to the tasks in turn
    assert batch["input_ids"].shape == (6, 64) and batch["patches"].shape == (6, 64, 16)
    again = GatoBatches(split, 64, seed=5, tasks=TASKS, patch_size=4).batch(5, 2)
    for k in batch:
        assert torch.equal(batch[k][2:4], again[k]), k
    V = split.vocab_size
    caption = batch["input_ids"][0]
    assert (caption[:4] == V + 1025).all() and caption[4] == V + 1024  # patches, "|", then the caption
    per_row = b.per_row
    assert (batch["patch_index"][0] >= 0).sum() == 4 * per_row and batch["example"][0].max() == per_row - 1
    words = b.captions  # "a digit seven" in the data's tokenizer, then end-of-text
    from pretrainer.tokenization import load_tokenizer

    tok = load_tokenizer(text / "tokenizer")
    assert tok.decode(words[7][:-1]) == "a digit seven" and words[7][-1] == tok.eos_id
    control = batch["labels"][2]
    assert ((control == IGNORE) | ((control >= V) & (control < V + 1024))).all()  # targets: value tokens
    assert (batch["labels"][1] != IGNORE).all()  # text: every token
    assert GatoBatches(split, 64, 5, ("caption",), 4).batch(0, 2)["task"].tolist() == [0, 0]


def test_gato_config_errors():
    with pytest.raises(ConfigError, match="gato.tasks='caption,speech'"):
        load_config(None, ["objective=gato", "gato.tasks=caption,speech"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="gato.patch_size=3"):
        load_config(None, ["objective=gato", "gato.patch_size=3"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="objective=gato trains arch=decoder"):
        load_config(None, ["objective=gato", "model=bert-tiny"]).validate(need_paths=False)


# ----------------------------------------------------------------------------------------------
# The model: patch embeddings at image positions, the decoder as it is


def _tiny_gato(vocab=40):
    from pretrainer.model import build_model
    from pretrainer.model.gato import GatoModel

    cfg = model_preset("gpt-nano")
    cfg.vocab_size, cfg.n_layer = vocab, 1
    return GatoModel(build_model(cfg), patch_size=4).eval()


def test_patch_positions_read_the_patches_not_the_token():
    torch.manual_seed(0)
    model = _tiny_gato()
    ids = torch.tensor([[39, 39, 39, 39, 38, 5, 6, 7]])
    index = torch.tensor([[0, 1, 2, 3, -1, -1, -1, -1]])
    patches = torch.zeros(1, 8, 16)
    patches[0, :4] = torch.randn(4, 16)
    with torch.no_grad():
        ref = model.hidden_states(ids, patches, index)
        model.decoder.tok_emb.weight[39] += 1.0  # the placeholder's own embedding is never read
        assert torch.equal(model.hidden_states(ids, patches, index), ref)
        other = patches.clone()
        other[0, 2] += 1.0  # a patch's pixels reach its position and those after it only (causal)
        out = model.hidden_states(ids, other, index)
        assert torch.equal(out[0, :2], ref[0, :2]) and not torch.allclose(out[0, 2:], ref[0, 2:])
        plain = model.decoder(ids[:, 4:]).logits  # without patches: the plain decoder's logits
        assert torch.equal(model(ids[:, 4:], torch.zeros(1, 4, 16), index[:, 4:]), plain)


def test_per_task_metrics_from_perfect_and_wrong_predictions(text):
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train.objectives import get_objective

    cfg = load_config(None, ["objective=gato", f"data={text}", "out=unused", "train.seq_len=64"])
    objective = get_objective(cfg)
    split = TokenSplit(text, "val")
    batch = next(objective.eval_batches(split, 6, 1))
    vocab = split.vocab_size + 1026

    class Oracle(torch.nn.Module):  # logits: one-hot on the label (or on a chosen wrong token)
        def __init__(self, wrong=()):
            super().__init__()
            self.wrong = set(wrong)

        def hidden_states(self, ids, patches, index):
            y = batch["labels"].clone()
            for r, c in self.wrong:
                y[r, c] = 0
            return torch.nn.functional.one_hot(y.clamp(min=0), vocab).float() * 30

        def head(self, h):
            return h

    m = objective.metrics({k: float(v) for k, v in objective.eval_sums(Oracle(), batch).items()})
    assert m["val_caption_accuracy"] == 1.0 and m["val_loss"] < 1e-9 and m["val_text_loss"] < 1e-9
    # the control error is the bins' own: each torque against the middle of its bin
    true = batch["target_values"][batch["task"] == 2][batch["labels"][batch["task"] == 2] != IGNORE].double()
    assert m["val_control_mae"] == pytest.approx((undiscretise(discretise(true)) - true).abs().mean().item())
    # one wrong token in the second caption of row 0 (a caption row): one caption of 2 rows' wrong
    row0 = batch["labels"][0]
    col = int(((row0 != IGNORE) & (batch["example"][0] == 1)).nonzero()[0])
    m = objective.metrics({k: float(v) for k, v in objective.eval_sums(Oracle([(0, col)]), batch).items()})
    n = 2 * objective._eval_builders[(str(split.dir), "val", 64)].per_row
    assert m["val_caption_accuracy"] == pytest.approx((n - 1) / n)


# ----------------------------------------------------------------------------------------------
# Runs: the trainer's loop, exact resume, per-task evaluation


def _gato_cfg(text, out, steps=4):
    return load_config(None, [
        "model=gpt-nano", "model.n_layer=1", "objective=gato", f"data={text}", f"out={out}",
        f"train.max_steps={steps}", "train.batch_size=6", "train.seq_len=64", "train.eval_every=2",
        "train.eval_batches=1", "train.log_every=1", "train.warmup_steps=2", "train.plot=false",
        "train.checkpoint_every=2", "train.threads=1"])


def test_gato_run_resumes_exactly_and_evaluates_per_task(text, tmp_path):
    import pretrainer
    from pretrainer.train.trainer import resume_config, train

    train(_gato_cfg(text, tmp_path / "a"), quiet=True)
    train(_gato_cfg(text, tmp_path / "b"), quiet=True, stop_at=3)
    train(resume_config(tmp_path / "b"), resume=True, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == [r["loss"] for r in again if "loss" in r] and len(losses) == 4
    evals = [r for r in rows if "val_loss" in r]
    assert {"val_caption_accuracy", "val_caption_loss", "val_text_loss", "val_control_loss",
            "val_control_mae"} <= set(evals[-1])
    assert "val_ppl" not in evals[-1]  # a mixture's loss: no perplexity
    assert all(math.isfinite(evals[-1][k]) for k in ("val_loss", "val_control_mae"))
    cfg = load_config(str(tmp_path / "a" / "config.yaml"))
    from pretrainer.data.tokens import TokenSplit

    assert cfg.model.vocab_size == TokenSplit(text, "train").vocab_size + 1026
    whole = pretrainer.load(tmp_path / "a", trained=True)
    assert type(whole).__name__ == "GatoModel" and type(pretrainer.load(tmp_path / "a")).__name__ == "DecoderLM"
