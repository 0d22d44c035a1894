"""Numerical faults and bad settings (issue 20): a non-finite step never reaches the weights, a
diverging run stops with a one-line message, a non-zero exit and finite checkpoints only, a
preempted run exits with its own status, and optimiser settings out of range are config errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrainer.config import RunConfig, TrainConfig, load_config, model_preset
from pretrainer.errors import EXIT_PREEMPTED, ConfigError, DivergenceError
from pretrainer.train import trainer
from pretrainer.train.checkpoint import list_checkpoints
from pretrainer.train.loop import DivergenceGuard, Env, StepResult, TrainStep, optimizer_step
from pretrainer.train.trainer import resume_config, train

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tiny_cfg(data, out, **train_kw) -> RunConfig:
    kw = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0,
              eval_batches=1, log_every=1, checkpoint_every=2, keep_checkpoints=2, plot=False)
    kw.update(train_kw)
    return RunConfig(model=model_preset("gpt-nano"), data=str(data), out=str(out), train=TrainConfig(**kw))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run)]


@pytest.fixture
def bad_losses(monkeypatch):
    """``bad_losses({step: factor})``: the training loss of those optimizer steps (1-based) times
    ``factor`` (nan, or a large number for a spike); evaluation is left alone."""
    plan = {}
    calls = [0]
    forward = TrainStep.forward

    def patched(self, batch, fn=None):
        out = forward(self, batch, fn)
        if fn is not None:
            return out
        calls[0] += 1
        return out * plan[calls[0]] if calls[0] in plan else out

    monkeypatch.setattr(TrainStep, "forward", patched)
    return plan.update


# ----------------------------------------------------------------------------------------------
# The step itself


def test_a_nan_step_leaves_weights_and_optimizer_untouched():
    """optimizer_step with a NaN loss: skipped, reported, and the weights, AdamW moments and step
    counter are exactly those before it; the next finite step trains again."""
    from pretrainer import build_model
    from pretrainer.train.optim import make_optimizer

    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=50, max_seq_len=16)
    t = TrainConfig(device="cpu", lr=1e-2, warmup_steps=0)
    env, opt = Env(t), make_optimizer(model, t, "cpu")

    class Objective:
        scale = 1.0

        def loss(self, m, batch):
            logits = m(batch["x"]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["x"].flatten()) * self.scale

    objective = Objective()
    step = TrainStep(model, objective)
    batch = [{"x": torch.randint(0, 50, (2, 16))}]
    count = lambda b: torch.tensor(float(b["x"].numel()), dtype=torch.float64)  # noqa: E731

    first = optimizer_step(step, model, opt, batch, count, env, grad_clip=1.0)
    assert not first.skipped and first.loss > 0 and first.grad_norm > 0
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}

    objective.scale = float("nan")
    bad = optimizer_step(step, model, opt, batch, count, env, grad_clip=1.0)
    assert bad.skipped and bad.loss != bad.loss  # nan
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for k, s in opt.state.items():
        assert all(torch.equal(moments[k][n], v) for n, v in s.items())  # the step counter included
    assert all(p.grad is None for p in model.parameters())  # dropped

    objective.scale = 1.0
    again = optimizer_step(step, model, opt, batch, count, env, grad_clip=1.0)
    assert not again.skipped
    assert not torch.equal(weights["tok_emb.weight"], model.state_dict()["tok_emb.weight"])


def test_the_guard_counts_skips_and_spikes_but_not_healthy_noise():
    g = DivergenceGuard(max_skipped=3, spike_factor=10)
    healthy = [5.0, 4.0, 6.0, 3.5, 9.0, 2.0]  # noisy and falling: no alarm, even at the first steps
    assert [g.check(StepResult(x, 1.0, False)) for x in healthy] == [None] * 6
    nan = StepResult(float("nan"), float("nan"), True)
    assert g.check(nan) is None and g.check(nan) is None and g.skipped == 2
    assert g.check(StepResult(4.0, 1.0, False)) is None and g.in_a_row == 0  # the streak ends
    assert "3 steps in a row" in (g.check(nan), g.check(nan), g.check(nan))[-1]
    spike = DivergenceGuard(max_skipped=3, spike_factor=10, state=g.state())  # as after a resume
    assert spike.skipped == 5 and list(spike.recent) == healthy + [4.0]
    assert "loss spike: 50" in spike.check(StepResult(50.0, 1.0, False))
    tiny = DivergenceGuard(3, 10, {"recent_losses": [0.01] * 50})  # a memorised corpus
    assert tiny.check(StepResult(0.5, 1.0, False)) is None  # the median counts as 1 nat
    assert DivergenceGuard(0, 0).check(StepResult(1e9, 1.0, False)) is None  # both off


# ----------------------------------------------------------------------------------------------
# The training loop


def test_an_injected_nan_step_is_skipped_counted_and_not_checkpointed(synthetic_data, tmp_path, bad_losses):
    bad_losses({4: float("nan")})
    run = tmp_path / "run"
    summary = train(tiny_cfg(synthetic_data, run, max_steps=6, checkpoint_every=1, keep_checkpoints=10),
                    quiet=True)
    assert summary["skipped_steps"] == 1 and summary["step"] == 6
    rows = {r["step"]: r for r in records(run) if "tokens_per_s" in r}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert "loss" not in rows[4] and all(rows[s]["loss"] == rows[s]["loss"] for s in (1, 2, 3, 5, 6))
    assert steps_of(run) == [1, 2, 3, 5, 6]  # none right after the skipped step
    assert all(finite(c) for c in list_checkpoints(run))
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["samples"] == 6 * 4  # the skipped step's data was skipped past too
    assert state["skipped_steps"] == 1


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_checkpoint(synthetic_data, tmp_path, bad_losses):
    bad_losses({s: float("nan") for s in range(5, 13)})
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"step 7: 3 steps in a row with a non-finite loss .*"
                                              r"train.max_skipped_steps=3.*step_00000004") as e:
        train(tiny_cfg(synthetic_data, run, max_skipped_steps=3), quiet=True)
    assert "\n" not in str(e.value)
    assert steps_of(run) == [2, 4] and all(finite(c) for c in list_checkpoints(run))
    assert records(run)[-1]["diverged"] is True


def test_a_loss_spike_stops_the_run(synthetic_data, tmp_path, bad_losses):
    bad_losses({6: 1000.0})
    with pytest.raises(DivergenceError, match=r"step 6: loss spike: .*over 10x the median of the last 5 steps"):
        train(tiny_cfg(synthetic_data, tmp_path / "run"), quiet=True)


def test_rollback_reloads_the_last_checkpoint_and_goes_on_with_later_data(synthetic_data, tmp_path, bad_losses):
    bad_losses({7: 1000.0})
    run = tmp_path / "run"
    summary = train(tiny_cfg(synthetic_data, run, on_spike="rollback"), quiet=True)
    assert summary["step"] == 12
    (back,) = [r for r in records(run) if "rollback" in r]
    assert back["step"] == 7 and back["rollback"] == "step_00000006" and "loss spike" in back["reason"]
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["samples"] == 12 * 4 and state["rollbacks"] == 1  # the data went on past the spike


def test_rollbacks_are_limited(synthetic_data, tmp_path, bad_losses):
    bad_losses({s: 1000.0 for s in range(7, 13)})
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match="step 10: loss spike"):
        train(tiny_cfg(synthetic_data, run, on_spike="rollback"), quiet=True)
    assert len([r for r in records(run) if "rollback" in r]) == trainer.MAX_ROLLBACKS == 3


def test_non_finite_weights_are_never_saved_nor_rotate_a_good_checkpoint_out(synthetic_data, tmp_path, monkeypatch):
    step = trainer.optimizer_step
    calls = [0]

    def poisoned(step_fn, model, *args, **kw):
        out = step(step_fn, model, *args, **kw)
        calls[0] += 1
        if calls[0] == 5:  # an update that overflowed
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("inf")
        return out

    monkeypatch.setattr(trainer, "optimizer_step", poisoned)
    run = tmp_path / "run"
    # the poisoned weights give non-finite losses: skipped, so no periodic checkpoint; the final
    # one finds them non-finite and refuses
    with pytest.raises(DivergenceError, match="step 12: the weights are not finite; stopped: .*step_00000004"):
        train(tiny_cfg(synthetic_data, run, keep_checkpoints=1, max_skipped_steps=0), quiet=True)
    assert steps_of(run) == [4] and finite(list_checkpoints(run)[0])


# ----------------------------------------------------------------------------------------------
# Through the command line


def pretrain(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrainer", "pretrain", *args], env=ENV,
                          capture_output=True, text=True, timeout=120, **kw)


def cli_args(data, out, *extra) -> list[str]:
    return ["model=gpt-nano", f"data={data}", f"out={out}", "train.batch_size=4", "train.seq_len=32",
            "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
            "train.plot=false", *extra]


def test_lr_1e4_stops_with_a_one_line_divergence_error_and_finite_checkpoints(synthetic_data, tmp_path):
    """The issue's check 3: from scratch (it diverges before the first checkpoint is due: none is
    written), and resumed from a healthy run with lr=1e4: the healthy checkpoints remain."""
    fresh = pretrain(*cli_args(synthetic_data, tmp_path / "fresh", "train.lr=1e4", "train.max_steps=20",
                               "train.checkpoint_every=5"))
    assert fresh.returncode == 3, fresh.stderr
    last = fresh.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "stopped: no checkpoint was written" in last
    assert list_checkpoints(tmp_path / "fresh") == []  # and so none with non-finite weights

    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=6, checkpoint_every=3), quiet=True)
    blown = pretrain("--resume", str(run), "train.lr=1e4", "train.max_steps=30", "train.checkpoint_every=1",
                     "train.warmup_steps=0")
    assert blown.returncode == 3, blown.stderr
    last = blown.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "stopped: the last good checkpoint is" in last
    assert steps_of(run)[0] <= 6 and all(finite(c) for c in list_checkpoints(run))


def test_sigterm_saves_a_checkpoint_and_exits_with_the_preempted_status(synthetic_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pretrainer", "pretrain",
                             *cli_args(synthetic_data, run, "train.max_steps=100000", "train.checkpoint_every=0")],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # training is under way
        if line.startswith("step") and "/100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == EXIT_PREEMPTED == 75, rest
    assert "stopped at step" in rest and len(list_checkpoints(run)) == 1


# ----------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr=inf: expected a positive, finite learning rate"),
    ("train.lr=.nan", "train.lr=nan: expected a positive, finite learning rate"),
    ("train.lr=0", "train.lr=0.0: expected a positive"),
    ("train.beta1=2", r"train.beta1=2.0: expected a value in \[0, 1\)"),
    ("train.beta2=1", r"train.beta2=1.0: expected a value in \[0, 1\)"),
    ("train.eps=0", "train.eps=0.0: expected a positive, finite value"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: expected a finite value >= 0"),
    ("train.grad_clip=.inf", "train.grad_clip=inf: expected a finite gradient norm >= 0"),
    ("train.min_lr_ratio=.nan", r"train.min_lr_ratio=nan: expected a value in \[0, 1\]"),
    ("train.spike_factor=0.5", "train.spike_factor=0.5: expected 0 .off. or a finite factor > 1"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps=-1: expected a value >= 0"),
    ("train.on_spike=retry", "train.on_spike='retry': expected one of stop, rollback"),
    ("model.init_std=1e30", r"model.init_std=1e\+30: expected a standard deviation in \(0, 1\]"),
    ("model.dropout=.nan", r"model.dropout=nan: expected a value in \[0, 1\)"),
    ("model.norm_eps=0", "model.norm_eps=0.0: expected a positive, finite value"),
])
def test_optimiser_and_model_values_out_of_range_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [override]).validate(need_paths=False)
    assert "\n" not in str(e.value)


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_allocated(synthetic_data, tmp_path):
    from pretrainer.data.tokens import TokenSplit

    n = len(TokenSplit(synthetic_data, "train"))
    with pytest.raises(ConfigError, match=rf"train.batch_size=2000 x train.grad_accum=4 x train.seq_len=128 = "
                                          rf"1,024,000 tokens per step, more than the {n:,} tokens of .*train split"):
        train(tiny_cfg(synthetic_data, tmp_path / "run", batch_size=2000, grad_accum=4, seq_len=128), quiet=True)
    assert not (tmp_path / "run").exists()


def test_every_process_skips_a_step_that_is_nan_on_one_of_them(synthetic_data, tmp_path, bad_losses):
    """DDP and FSDP on two processes (torchrun, gloo), the loss NaN on the second process only at
    step 3: both skip it (else the replicas would part, or a collective hang), and the losses
    logged are those of one process whose step 3 was NaN."""
    common = ["model=gpt-nano", f"data={synthetic_data}", "train.max_steps=5", "train.seq_len=32",
              "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=1",
              "train.checkpoint_every=0", "train.plot=false"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"overrides": common + [f"out={tmp_path / mode}", "train.batch_size=2",
                                                        f"train.parallel={mode}"], "nan_rank": 1, "nan_step": 3}
                                for mode in ("ddp", "fsdp")]))
    worker = Path(__file__).parent / "helpers" / "nan_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(worker), str(spec)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    bad_losses({3: float("nan")})
    train(load_config(None, common + [f"out={tmp_path / 'one'}", "train.batch_size=4"]), quiet=True)
    one = {r["step"]: r for r in records(tmp_path / "one") if "tokens_per_s" in r}
    assert "loss" not in one[3] and one[5]["skipped_steps"] == 1
    for mode in ("ddp", "fsdp"):
        two = {r["step"]: r for r in records(tmp_path / mode) if "tokens_per_s" in r}
        assert "loss" not in two[3] and two[5]["skipped_steps"] == 1, mode
        for s in (1, 2, 4, 5):
            assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), (mode, s)


# ----------------------------------------------------------------------------------------------
# Arguments and half-written metadata


@pytest.mark.parametrize("argv, message", [
    (["generate", "RUN", "--max-new-tokens", "-1"], "--max-new-tokens: -1: expected an integer >= 0"),
    (["generate", "RUN", "--temperature", "-0.5"], "--temperature: -0.5: expected a finite number >= 0"),
    (["generate", "RUN", "--top-p", "1.5"], "--top-p: 1.5: expected a number in (0, 1]"),
    (["generate", "RUN", "--num-samples", "0"], "--num-samples: 0: expected a positive integer"),
    (["embed", "RUN", "--input", "x", "--max-len", "0"], "--max-len: 0: expected a positive integer"),
    (["evaluate", "RUN", "--batch-size", "0"], "--batch-size: 0: expected a positive integer"),
    (["info", "gpt2-small", "--seq-len", "-1"], "--seq-len: -1: expected a positive integer"),
    (["pretrain", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["pretrain"], "data: missing"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    from pretrainer.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_last_metrics_line_cut_short_is_dropped_with_a_warning_on_resume(synthetic_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(synthetic_data, out, max_steps=6), stop_at=4, quiet=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # the process died while writing this line
    train(resume_config(str(out), []), resume=True, quiet=True)
    assert "dropped a last line cut short" in capsys.readouterr().err
    assert steps_of(out)[-1] == 6 and all(isinstance(r, dict) for r in records(out))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo\n{"step": 8}\n')  # damage before the last line is an error, not a guess
    with pytest.raises(trainer.DataError, match=r"metrics.jsonl:\d+: not a JSON row"):
        trainer.read_metrics(out / "metrics.jsonl")


def test_data_tokenized_by_another_tokenizer_is_refused_on_resume_and_evaluate(synthetic_data, span_data,
                                                                              tmp_path, capsys):
    """The manifest's tokenizer hash against the run's tokenizer: token ids of another tokenizer
    would mean other words (the losses would be silently wrong)."""
    from pretrainer.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(synthetic_data, out, max_steps=4), stop_at=2, quiet=True)
    with pytest.raises(ConfigError, match="tokenized with another tokenizer"):
        train(resume_config(str(out), [f"data={span_data}"]), resume=True, quiet=True)
    assert main(["evaluate", str(out), "--data", str(span_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data=" in err[0] and "another tokenizer" in err[0], err
    assert main(["evaluate", str(out), "--json", "--max-batches", "1"]) == 0  # its own data is fine


def test_out_must_be_absent_empty_or_of_the_same_kind(synthetic_data, tmp_path, capsys):
    """A file, a data folder or someone's notes are never written into: one line, exit 2."""
    from pretrainer import build_model
    from pretrainer.cli import main
    from pretrainer.interop.hf import export_hf

    (tmp_path / "a-file").write_text("x")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    hf = export_hf(build_model("gpt-nano", vocab_size=50, max_seq_len=16), tmp_path / "hf")
    for argv, expected in [
        (["import", str(hf), "--out", str(synthetic_data)], "holds other files (manifest.json"),
        (["import", str(hf), "--out", str(notes)], "expected an empty folder or a run folder"),
        (["import", str(hf), "--out", str(tmp_path / "a-file")], "is a file"),
        (["pretrain", "model=gpt-nano", f"data={synthetic_data}", f"out={tmp_path / 'a-file'}"], "is a file"),
        (["pretrain", "model=gpt-nano", f"data={synthetic_data}", f"out={synthetic_data}"], "holds other files"),
        (["pretrain", "model=gpt-nano", f"data={synthetic_data}", f"out={notes}"], "holds other files (todo.txt)"),
        (["tokenizer", "train", "--corpus", "builtin:synthetic", "--kind", "char", "--out", str(notes)],
         "expected an empty folder or a tokenizer folder"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_config_yaml_cut_short_is_one_line_naming_the_file_and_line(synthetic_data, tmp_path, capsys):
    from pretrainer.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(synthetic_data, out, max_steps=2), quiet=True)
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text[: len(text) // 2] + "\n  bad: [1,\n")
    assert main(["pretrain", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'config.yaml'} line " in err[0] and "not valid YAML" in err[0], err


def test_finetune_refuses_an_out_with_foreign_files(tmp_path, capsys):
    from pretrainer.finetune.runner import finetune

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"holds other files \(todo.txt\); expected an empty folder or a "
                                          r"fine-tuning run folder"):
        finetune("bert-tiny", "classification", "builtin:stdlib-package", str(notes), from_scratch=True)
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_generate_reads_only_utf8_text_and_says_when_a_prompt_is_longer_than_the_context(synthetic_data, tmp_path,
                                                                                         capsys):
    from pretrainer import build_model
    from pretrainer.cli import main
    from pretrainer.interop.hf import export_hf, import_run

    torch.manual_seed(0)
    hf = export_hf(build_model("gpt-nano", vocab_size=320, max_seq_len=16), tmp_path / "hf",
                   tokenizer_dir=synthetic_data / "tokenizer")
    run = import_run(hf, tmp_path / "run")
    (tmp_path / "binary.txt").write_bytes(b"ok\n\xff\xfe\x00")
    for path, message in [(tmp_path / "absent.txt", "absent.txt: no such file"),
                          (tmp_path, "is a folder; expected a text file"),
                          (tmp_path / "binary.txt", "binary.txt: not UTF-8 text (byte 3)")]:
        assert main(["generate", str(run), "--input", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (tmp_path / "long.txt").write_text("the quick brown fox " * 20 + "\nshort\n")
    assert main(["generate", str(run), "--input", str(tmp_path / "long.txt"), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: prompt 1 is" in err and "more than the model's context of 16; only its last 16" in err
    assert "prompt 2" not in err
