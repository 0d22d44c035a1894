"""Fine-tuning settings: batches grouped by length (hand-worked groups, determinism), the kept epoch
(ties broken by the evaluation loss, never a one-class predictor over one that is not; the last
epoch reported beside it), backbone overrides (model.dropout, model.max_seq_len; other model keys
refused in one line) and --json keeping the progress lines on stderr."""

import json

import pytest
import torch
import yaml

from pretrainer.cli import main
from pretrainer.errors import ConfigError
from pretrainer.finetune import finetune
from pretrainer.finetune import runner
from pretrainer.finetune.backbone import with_settings
from pretrainer.finetune.runner import better_epoch, group_by_length
from pretrainer.model import build_model
from test_finetune import sentiment_tsv


# ----------------------------------------------------------------------------------------------
# Batches grouped by length


def test_groups_are_sorted_by_length_and_the_batches_shuffled():
    lengths = [5, 1, 4, 2, 8, 3, 7, 6]
    order = list(range(8))
    # groups of 2 batches of 2: [0 1 2 3] by length -> 1 3 | 2 0; [4 5 6 7] -> 5 7 | 6 4
    out = group_by_length(order, lengths, 2, torch.Generator().manual_seed(0), group=2)
    batches = [tuple(out[i:i + 2]) for i in range(0, 8, 2)]
    assert sorted(batches) == sorted([(1, 3), (2, 0), (5, 7), (6, 4)])
    orders = {tuple(group_by_length(order, lengths, 2, torch.Generator().manual_seed(s), group=2)) for s in range(20)}
    assert len(orders) > 1  # the batches' order is shuffled ...
    again = group_by_length(order, lengths, 2, torch.Generator().manual_seed(0), group=2)
    assert again == out  # ... by the generator alone


def test_a_short_last_batch_stays_last_and_every_feature_keeps_its_count():
    lengths = [3, 9, 1, 7, 5, 2, 8]
    order = [6, 0, 5, 1, 3, 2, 4, 0]  # text2text's temperature mixing may repeat a feature
    out = group_by_length(order, lengths, 3, torch.Generator().manual_seed(1), group=50)
    assert sorted(out) == sorted(order)
    # one group; by length (in brackets): 2 (1), 5 (2), 0 (3), 0 (3), 4 (5), 3 (7), 6 (8), 1 (9)
    assert out[-2:] == [6, 1]  # the two longest are the short batch, kept at the end
    assert sorted(tuple(out[i:i + 3]) for i in (0, 3)) == [(0, 4, 3), (2, 5, 0)]


def test_grouping_cuts_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (3200,), generator=gen).tolist()
    order = torch.randperm(3200, generator=gen).tolist()

    def padded(o):
        return sum(32 * max(lengths[i] for i in o[k:k + 32]) for k in range(0, len(o), 32))

    grouped = group_by_length(order, lengths, 32, gen)  # 100 batches: 4 groups of 25
    assert padded(grouped) < 0.6 * padded(order)
    assert padded(grouped) < 1.05 * sum(lengths)



def test_a_small_epoch_is_grouped_in_at_least_four_groups():
    """12 batches: groups of 3 batches (24 features) rather than one sorted epoch. Lengths i % 7
    give each length 3 or 4 features in a group, so the second batch of the first group spans
    three lengths (2, 3, 4); sorted whole, every length has 13 or more and no batch spans more than two."""
    def widest(order):
        return max(max(i % 7 for i in order[k:k + 8]) - min(i % 7 for i in order[k:k + 8]) for k in range(0, 96, 8))

    lengths = [i % 7 for i in range(96)]
    small = group_by_length(list(range(96)), lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(small) == list(range(96)) and widest(small) == 2
    assert widest(group_by_length(list(range(96)), lengths, 8, torch.Generator().manual_seed(0), group=12)) == 1


# ----------------------------------------------------------------------------------------------
# The kept epoch


def test_selection_prefers_a_model_that_answers_more_than_one_class():
    constant = {"accuracy": 0.5, "eval_loss": 0.60, "one_class": "0"}
    varied = {"accuracy": 0.5, "eval_loss": 0.70}
    assert better_epoch(varied, constant, "accuracy")  # equal accuracy: not the constant one ...
    assert not better_epoch(constant, varied, "accuracy")  # ... in either order, lower loss or not
    assert not better_epoch({**constant, "accuracy": 0.6}, varied, "accuracy")  # even when it scores higher
    assert better_epoch(varied, {**constant, "accuracy": 0.6}, "accuracy")
    assert better_epoch(varied, constant, "eval_loss", lower=True)  # whatever the rule
    assert better_epoch({**constant, "eval_loss": 0.5}, constant, "accuracy")  # both constant: as usual


def test_selection_breaks_ties_by_the_evaluation_loss():
    kept = {"accuracy": 0.8, "eval_loss": 0.5}
    assert better_epoch({"accuracy": 0.8, "eval_loss": 0.4}, kept, "accuracy")
    assert not better_epoch({"accuracy": 0.8, "eval_loss": 0.5}, kept, "accuracy")  # a full tie: the earlier
    assert not better_epoch({"accuracy": 0.8, "eval_loss": 0.6}, kept, "accuracy")
    assert better_epoch({"accuracy": 0.9, "eval_loss": 0.9}, kept, "accuracy")
    assert better_epoch({"f1": 0.3}, None, "f1")
    assert better_epoch({"eval_loss": 0.3}, {"eval_loss": 0.4}, "eval_loss", lower=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pretrainer.tokenization import Tok

    d = tmp_path_factory.mktemp("ft_settings")
    train, dev = sentiment_tsv(d / "train.tsv", 48, 1), sentiment_tsv(d / "dev.tsv", 16, 2)
    Tok.train([line.split("\t")[0] for line in train.read_text().splitlines()[1:]], "wordpiece", 120).save(d / "tok")
    return d, train, dev


def args(d, train, dev, out, *more):
    return ["finetune", "bert-tiny", "--from-scratch", "--task", "classification", "--train", str(train),
            "--eval", str(dev), "--tokenizer", str(d / "tok"), "--max-len", "16", "--batch-size", "16",
            "--out", str(out), *more]


@pytest.mark.parametrize("constant_epoch", [1, 2])
def test_an_epoch_of_equal_accuracy_that_answers_one_class_is_not_kept(data, tmp_path, monkeypatch, capsys,
                                                                         constant_epoch):
    """Two epochs score the same accuracy; the one whose predictions are all one class (and has the
    lower evaluation loss, so the tie-break alone would keep it) is not kept."""
    d, train, dev = data
    real_evaluate, calls = runner.evaluate, []

    losses = iter([0.6, 0.7] if constant_epoch == 1 else [0.7, 0.6])

    def evaluate(task, model, examples, feats, *rest, loss=False):
        calls.append(1)
        _, preds = real_evaluate(task, model, examples, feats, *rest)
        epoch = len(calls)  # the third call scores the kept weights
        one = epoch == constant_epoch
        labels = ["0"] * len(preds) if one else [task.labels[i % 2] for i in range(len(preds))]
        preds = [{**p, "label": y} for p, y in zip(preds, labels)]
        return {"accuracy": 0.5, "f1": 0.5, "majority_baseline": 0.5, **({"eval_loss": next(losses)} if loss else {})}, preds

    monkeypatch.setattr(runner, "evaluate", evaluate)
    code = main(args(d, train, dev, tmp_path / "run", "--epochs", "2", "--json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    kept = 3 - constant_epoch
    assert result["epoch"] == kept and result["one_class"] is None
    state = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["epoch"] == kept  # the kept weights are that epoch's
    assert result["last"]["epoch"] == 2 and result["last"]["accuracy"] == 0.5
    assert (result["last"].get("one_class") == "0") == (constant_epoch == 2)  # the last epoch is flagged
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["best"]["epoch"] == kept and saved["last"]["epoch"] == 2
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e.get("one_class") for e in evals] == [("0" if e["epoch"] == constant_epoch else None) for e in evals]
    assert "predicts '0' for every example" in err


def test_the_summary_line_shows_the_last_epoch_beside_the_kept_one():
    from pretrainer.finetune.cli import _report

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _report({"run": "r", "task": "classification", "epoch": 1, "epochs_run": 3, "seconds": 4, "accuracy": 0.8,
                 "one_class": None, "selected_by": "accuracy",
                 "last": {"epoch": 3, "accuracy": 0.5, "eval_loss": 0.7, "one_class": "1"}}, False)
    line = buf.getvalue()
    assert "best epoch 1 (by accuracy) of 3 | accuracy 0.8000" in line
    assert "last epoch 3: accuracy 0.5000, eval_loss 0.7000, predicts '1' for every example" in line


# ----------------------------------------------------------------------------------------------
# Backbone overrides


def test_with_settings_keeps_the_weights_and_refuses_a_table_that_cannot_change():
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=64).eval()
    ids = torch.randint(4, 64, (2, 9))
    before = model.hidden_states(ids)
    state = torch.random.get_rng_state()
    same = with_settings(model, {"dropout": 0.0})
    assert same is model  # nothing changes: nothing rebuilt
    drop = with_settings(model, {"dropout": 0.3}).eval()
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    assert drop.cfg.dropout == 0.3 and all(m.p == 0.3 for m in drop.modules() if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(drop.hidden_states(ids), before, rtol=0, atol=0)  # the same weights
    drop.train()
    assert not torch.allclose(drop.hidden_states(ids), before)  # dropout is on while training
    with pytest.raises(ConfigError, match=r"model.max_seq_len=64: the backbone.s pos_emb.weight has shape \(512, 128\), this setting needs \(64, 128\)"):
        with_settings(model, {"max_seq_len": 64})
    rope = build_model("llama-tiny", vocab_size=64, n_layer=1).eval()
    longer = with_settings(rope, {"max_seq_len": 2048}).eval()  # rotary positions: no table to refit
    assert longer.cfg.max_seq_len == 2048
    torch.testing.assert_close(longer.hidden_states(ids), rope.hidden_states(ids), rtol=0, atol=0)


def test_model_overrides_come_from_flags_set_a_file_and_key_value_arguments(tmp_path, capsys):
    from pretrainer.cli import build_parser
    from pretrainer.finetune.cli import finetune_options

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("finetune:\n  epochs: 2\n  model:\n    dropout: 0.05\n    max_seq_len: 64\n")
    base = ["finetune", "bert-tiny", "--task", "classification", "--train", "x", "--out", "o"]
    opts = finetune_options(build_parser().parse_args(base + ["-c", str(cfg)]))
    assert opts["model"] == {"dropout": 0.05, "max_seq_len": 64} and opts["epochs"] == 2
    argv = ["finetune", "bert-tiny", "model.dropout=0.2", "--task", "classification", "--train", "x", "--out", "o",
            "--model", "max_seq_len=128", "--dropout", "0.3", "--no-group-by-length"]
    opts = finetune_options(build_parser().parse_args(argv))
    assert opts["model"] == {"dropout": 0.2, "max_seq_len": 128} and opts["dropout"] == 0.3
    assert opts["group_by_length"] is False
    opts = finetune_options(build_parser().parse_args(base + ["--set", "model.dropout=0.25", "--set", "lr=3e-4"]))
    assert opts["model"] == {"dropout": 0.25} and opts["lr"] == 3e-4
    assert finetune_options(build_parser().parse_args(base))["group_by_length"] is True  # the default
    for bad, needle in (("model.n_layer=2", "model.n_layer: fixed by the backbone's weights; fine-tuning can "
                                           "change model.dropout and model.max_seq_len only"),
                        ("model.dropuot=0.1", "unknown model key (did you mean 'model.dropout'?)"),
                        ("model.dropout=1.5", "model.dropout=1.5: expected a value in [0, 1)"),
                        ("model.max_seq_len=lots", "model.max_seq_len='lots': expected an integer")):
        code = main(base[:2] + [bad] + base[2:-1] + [str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_the_backbone_dropout_is_said_and_saved_and_json_keeps_progress_on_stderr(data, tmp_path, capsys):
    d, train, dev = data
    code = main(args(d, train, dev, tmp_path / "a", "--epochs", "1", "--json"))
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["epoch"] == 1  # stdout: the JSON only
    first = err.splitlines()[0]
    assert first.startswith("fine-tuning bert-tiny") and "dropout 0.1 in the model, 0.1 on the head" in first
    assert "batches grouped by length" in first and "epoch 1/1 | step" in err  # progress on stderr
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["model"]["dropout"] == 0.1 and saved["options"]["group_by_length"] is True
    code = main(args(d, train, dev, tmp_path / "b", "model.dropout=0", "--epochs", "1", "--quiet", "--json",
                     "--no-group-by-length"))
    out, err = capsys.readouterr()
    assert code == 0 and "epoch 1/1" not in err and "fine-tuning" not in err and json.loads(out)["epoch"] == 1
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["model"]["dropout"] == 0.0 and saved["options"]["model"] == {"dropout": 0.0}
    assert saved["options"]["group_by_length"] is False
