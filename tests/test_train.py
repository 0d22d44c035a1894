"""The training loop: data order, schedule, exact resume, checkpoint safety, multi-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrainer.config import RunConfig, TrainConfig, load_config, model_preset
from pretrainer.data.tokens import CLMBatches, TokenSplit, WindowOrder
from pretrainer.errors import ConfigError
from pretrainer.train.checkpoint import list_checkpoints
from pretrainer.train.optim import lr_at, param_groups
from pretrainer.train.trainer import train, resume_config


def tiny_cfg(data, out, **train_kw) -> RunConfig:
    model = model_preset("gpt-nano")
    model.dropout = 0.1  # so that exact resume also needs the RNG state
    kw = dict(max_steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=10,
              eval_batches=2, log_every=5, checkpoint_every=10, keep_checkpoints=5, plot=False)
    kw.update(train_kw)
    return RunConfig(model=model, data=str(data), out=str(out), train=TrainConfig(**kw))


def logged(run: Path, key: str = "loss") -> dict:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_gpt_targets_are_inputs_shifted_by_one(synthetic_data):
    split = TokenSplit(synthetic_data, "train")
    x, y = CLMBatches(split, 16, seed=0).batch(0, 4)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    order = CLMBatches(split, 16, seed=0).order
    start = order.start(2)
    assert torch.equal(x[2], torch.from_numpy(split.read(start, 16)))


def test_window_order_visits_every_window_once_per_epoch_and_seeks():
    order = WindowOrder(n_tokens=10_000, seq_len=64, seed=3)
    n = order.n_windows
    epoch0 = [order.start(g) for g in range(n)]
    phase = epoch0[0] % 64
    assert sorted((s - phase) // 64 for s in epoch0) == list(range(n))
    assert all(s + 65 <= 10_000 for s in epoch0)
    epoch1 = [order.start(g) for g in range(n, 2 * n)]
    assert epoch1 != epoch0  # a new permutation (and phase) each epoch
    fresh = WindowOrder(n_tokens=10_000, seq_len=64, seed=3)
    assert fresh.start(n + 7) == epoch1[7]  # random access: no replay needed


def test_lr_schedule_warmup_then_cosine_to_min():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(10, TrainConfig(lr=2.0, schedule="constant", warmup_steps=0)) == 2.0


def test_weight_decay_only_on_matrices():
    from pretrainer.model import build_model

    model = build_model("gpt2-small", n_layer=2, d_model=32, n_head=2, vocab_size=50)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_rms_lr_scale_gives_each_tensor_a_rate_in_proportion_to_its_size():
    from pretrainer.model import build_model

    model = build_model("t5-tiny", n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=64)
    groups = param_groups(model, 0.1, "rms")
    assert len(groups) == len(list(model.parameters()))
    for g in groups:
        (p,) = g["params"]
        assert g["lr_scale"] == pytest.approx(max(1e-3, p.detach().pow(2).mean().sqrt().item()))
        assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0)
    by_id = {id(g["params"][0]): g["lr_scale"] for g in groups}
    emb, down = by_id[id(model.tok_emb.weight)], by_id[id(model.encoder.blocks[0].mlp.down.weight)]
    assert emb == pytest.approx(1.0, rel=0.05)  # T5 draws embeddings N(0, 1)
    assert down == pytest.approx(64 ** -0.5, rel=0.1)  # and matrices N(0, 1/fan_in)


@pytest.mark.parametrize("lr_scale", ["none", "rms"])
def test_resume_is_bit_exact(synthetic_data, tmp_path, lr_scale):
    full = tmp_path / "full"
    train(tiny_cfg(synthetic_data, full, lr_scale=lr_scale), quiet=True)
    part = tmp_path / "part"
    train(tiny_cfg(synthetic_data, part, lr_scale=lr_scale), stop_at=15, quiet=True)
    assert max(logged(part)) == 15
    from pretrainer.train.trainer import resume_config

    train(resume_config(part), resume=True, quiet=True)
    a, b = logged(full), logged(part)
    assert sorted(a) == sorted(b) == [5, 10, 15, 20, 25, 30]
    assert a == b  # bit for bit
    assert logged(full, "val_loss") == logged(part, "val_loss")
    assert a[30] < a[5]


def test_truncated_latest_checkpoint_falls_back_to_previous(synthetic_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=20), quiet=True)
    newest = list_checkpoints(run)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash mid-copy
    from pretrainer.train.trainer import resume_config

    summary = train(resume_config(run, ["train.max_steps=25"]), resume=True)
    err = capsys.readouterr().err
    assert "skipping broken checkpoint" in err and "step_00000020" in err and "truncated" in err
    assert "from step_00000010" in err
    assert summary["step"] == 25


def test_refuses_to_overwrite_a_run(synthetic_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=5), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_cfg(synthetic_data, run, max_steps=5), quiet=True)


def test_config_typos_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"train.batch_size='big': expected an integer"):
        load_config(None, ["train.batch_size=big"])
    f = tmp_path / "c.yaml"
    f.write_text("model: llama-tiny\ntrain:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_config(str(f))
    f.write_text("model:\n  preset: llama-tiny\n  n_layer: 2\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(str(f), ["model.d_model=64"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.norm, cfg.train.lr) == (2, 64, "rmsnorm", 3e-4)
    cfg = load_config(None, ["model=gpt2-small", "train.device=cpu"])
    assert cfg.model.n_layer == 12 and cfg.model.vocab_size is None  # GPT-2's 50,257 only when given
    assert load_config(None, ["model=gpt2-small", "model.vocab_size=50257"]).model.vocab_size == 50257
    with pytest.raises(ConfigError, match="train.device='gpu'"):
        cfg.train.device = "gpu"
        cfg.validate(need_paths=False)
    with pytest.raises(ConfigError, match="train.lr_scale='relative'"):
        load_config(None, ["train.lr_scale=relative"]).validate(need_paths=False)


def _torchrun(nproc, args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "pretrainer", "pretrain", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_match_one_process(synthetic_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [f"data={synthetic_data}", "model=gpt-nano", "train.max_steps=8", "train.seq_len=32",
              "train.log_every=2", "train.eval_every=4", "train.warmup_steps=2", "train.plot=false",
              "--quiet"]
    one = subprocess.run([sys.executable, "-m", "pretrainer", "pretrain", *common,
                          f"out={tmp_path / 'one'}", "train.batch_size=8"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, common + [f"out={tmp_path / 'two'}", "train.batch_size=4"], env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert sorted(a) == sorted(b) == [2, 4, 6, 8]
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)
    va, vb = logged(tmp_path / "one", "val_loss"), logged(tmp_path / "two", "val_loss")
    np.testing.assert_allclose(list(va.values()), list(vb.values()), rtol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_resume_via_cli_matches_an_uninterrupted_run(synthetic_data, tmp_path):
    """Interrupt a CLI run at an arbitrary step (SIGINT), resume it with --resume: every logged
    loss equals that of the same run left alone."""
    import signal
    import time

    args = ["model=gpt-nano", f"data={synthetic_data}", "train.max_steps=150", "train.seq_len=32",
            "train.batch_size=4", "train.log_every=5", "train.eval_every=50", "train.checkpoint_every=0",
            "train.plot=false", "model.dropout=0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full = tmp_path / "full"
    done = subprocess.run([sys.executable, "-m", "pretrainer", "pretrain", *args, f"out={full}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "pretrainer", "pretrain", *args, f"out={cut}"],
                            env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training is under way, then interrupt
        if line.startswith("step") and "/150" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 75, rest  # stopped with a checkpoint: EXIT_PREEMPTED
    import re

    stopped = int(re.search(r"stopped at step (\d+)", rest).group(1))
    assert 0 < stopped < 150
    resumed = subprocess.run([sys.executable, "-m", "pretrainer", "pretrain", "--resume", str(cut)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert logged(full) == logged(cut)
    assert logged(full, "val_loss") == logged(cut, "val_loss")


@pytest.mark.slow
def test_two_thousand_step_run_resumed_at_step_1234_is_bit_exact(synthetic_data, tmp_path):
    """The issue's check at full length: 2,000 steps straight vs stopped at 1,234 and resumed."""
    from pretrainer.train.trainer import resume_config

    kw = dict(max_steps=2000, batch_size=2, seq_len=16, eval_every=500, log_every=50,
              checkpoint_every=1000)
    train(tiny_cfg(synthetic_data, tmp_path / "full", **kw), quiet=True)
    train(tiny_cfg(synthetic_data, tmp_path / "part", **kw), stop_at=1234, quiet=True)
    train(resume_config(tmp_path / "part"), resume=True, quiet=True)
    a, b = logged(tmp_path / "full"), logged(tmp_path / "part")
    assert len(a) == 40 and a == b
    assert logged(tmp_path / "full", "val_loss") == logged(tmp_path / "part", "val_loss")


def test_resuming_with_a_longer_schedule_says_what_the_rate_does_and_records_it(synthetic_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=10, warmup_steps=2, eval_every=0), quiet=True)
    summary = train(resume_config(run), resume=True, quiet=True)  # finished: nothing to do, nothing changed
    assert summary["nothing_to_do"] and summary["step"] == 10
    assert "nothing to do, the run is at step 10" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000010"
    train(resume_config(run, ["train.max_steps=20"]), resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "train.max_steps 10 -> 20: the cosine schedule is recomputed, so at step 10 the learning rate" in err
    assert "(rising again)" in err
    assert resume_config(run).train.max_steps == 20  # config.yaml holds the values in force


def test_a_time_budget_stops_the_run_with_a_checkpoint_and_a_final_evaluation(synthetic_data, tmp_path):
    import torch

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    summary = train(tiny_cfg(synthetic_data, run, max_steps=100_000, eval_every=0, max_minutes=0.05, threads=1),
                    quiet=True)
    assert torch.get_num_threads() == threads  # the run's thread count is not left behind
    assert summary["out_of_time"] and 0 < summary["step"] < 100_000 and summary["seconds"] < 3 + 20
    assert list_checkpoints(run)[-1].name == f"step_{summary['step']:08d}"
    assert "val_loss" in logged_all(run)[-1] and logged_all(run)[-1]["step"] == summary["step"]
    assert resume_config(run).train.max_steps == 100_000  # a later --resume goes on from there


def logged_all(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_preset_takes_the_datas_vocabulary_unless_a_size_is_given(synthetic_data, tmp_path):
    from pretrainer.config import load_config

    cfg = load_config(None, ["model=bert-tiny", "objective=mlm", f"data={synthetic_data}", f"out={tmp_path / 'a'}",
                             "train.max_steps=1", "train.batch_size=2", "train.seq_len=16", "train.eval_every=0",
                             "train.plot=false"])
    assert cfg.model.vocab_size is None  # bert-tiny's 30,522 is BERT's tokenizer's, not this data's
    train(cfg, quiet=True)
    assert resume_config(tmp_path / "a").model.vocab_size == 300  # the synthetic data's BPE
    given = load_config(None, ["model=bert-tiny", "model.vocab_size=30522"])
    assert given.model.vocab_size == 30522


def test_evaluation_reports_progress_on_a_long_split(synthetic_data, tmp_path, monkeypatch):
    """``evaluate_split(progress=...)`` is called every 5 seconds with (done, total, seconds): the clock
    is made to run 6 s per batch here, so each batch after the first reports."""
    from pretrainer import load
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.train import trainer
    from pretrainer.train.objectives import get_objective

    run = tmp_path / "run"
    cfg = tiny_cfg(synthetic_data, run, max_steps=1, eval_every=0)
    train(cfg, quiet=True)
    clock = iter(range(0, 10_000, 6))
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: float(next(clock)))
    seen = []
    trainer.evaluate_split(load(run), get_objective(cfg), TokenSplit(synthetic_data, "val"), 2, 4, seq_len=32,
                           progress=lambda done, total, s: seen.append((done, total)))
    assert seen == [(i, 4) for i in range(4)]  # before each batch, as the clock says 5 s have passed
