"""Scaling sweeps: records (N, D, C), resuming, cluster commands, lr search, warnings, analysis helpers,
and 'scaling fit|plan' on a sweep folder."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pretrainer.errors import ConfigError
from pretrainer.scaling.sweep import (Size, isoflop_minimum, late_drop, load_base, model_for, parse_count,
                                      parse_sizes, pick_rate, plan_sweep, run_sweep, tokens_to_reach, _options)

MICRO = """
model:
  preset: gpt-nano
  d_model: 32
  n_head: 2
  max_seq_len: 32
train:
  batch_size: 4
  seq_len: 32
  lr: 3.0e-3
  warmup_steps: 5
  eval_batches: 2
  device: cpu
  plot: false
sweep:
  sizes: 16x1,32x1,32x2
  tokens: 4k,8k
  corpus: {corpus}
  evals: 4
  bootstrap: 10
"""


def micro_config(tmp_path, corpus="builtin:synthetic"):
    f = tmp_path / "micro.yaml"
    f.write_text(MICRO.format(corpus=corpus))
    return str(f)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = micro_config(tmp)
    out = tmp / "sw"
    summary = run_sweep(cfg, out, quiet=True)
    return cfg, out, summary


def test_sweep_records_n_d_c(micro):
    from pretrainer.model.info import model_info

    cfg, out, summary = micro
    recs = rows(out / "sweep.jsonl")
    assert len(recs) == 6 and summary["n_runs"] == 6
    base, _ = load_base(cfg)
    base.model.vocab_size = json.loads((out / "data" / "manifest.json").read_text())["vocab_size"]
    for r in recs:
        m = model_for(base.model, Size(r["d_model"], r["n_layer"], r["n_head"]))
        info = model_info(m, 32)
        assert r["N"] == info["params_non_embedding"] and r["params"] == info["params"]
        assert r["D"] == r["steps"] * 4 * 32 and r["steps"] in (31, 62)  # round(4000 / 128), round(8000 / 128)
        assert r["C"] == pytest.approx(6 * r["N"] * r["D"])
        assert r["C_attn"] == pytest.approx((6 * r["N"] + 6 * r["n_layer"] * 32 * r["d_model"]) * r["D"])
        metrics = rows(out / r["run"] / "metrics.jsonl")
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        assert r["loss"] == r["final_val_loss"] == vals[-1] and r["best_val_loss"] == min(vals)
        assert r["lr"] == 3e-3 and r["lr_rule"] == "fixed" and r["wall_s"] > 0
        assert r["epochs"] == pytest.approx(r["D"] / json.loads((out / "data" / "manifest.json").read_text())
                                            ["splits"]["train"]["tokens"])
    for name in ("summary.json", "summary.csv", "fit.json", "loss_curves.png", "loss_vs_N.png", "isoflop.png",
                 "sample_efficiency.png"):
        assert (out / name).is_file(), name
    assert "sample_efficiency" in json.loads((out / "summary.json").read_text())


def test_second_invocation_skips_finished_runs(micro):
    cfg, out, _ = micro
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")}
    lines = (out / "sweep.jsonl").read_text()
    run_sweep(cfg, out, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")} == stamps
    assert (out / "sweep.jsonl").read_text() == lines


def test_interrupted_run_resumes_from_its_checkpoint(micro, capsys):
    import shutil

    from pretrainer.train.trainer import train

    cfg, out, _ = micro
    recs = rows(out / "sweep.jsonl")
    victim = next(r for r in recs if r["steps"] == 62 and r["d_model"] == 32 and r["n_layer"] == 1)
    run = out / victim["run"]
    from pretrainer.config import config_from_file

    run_cfg = config_from_file(run / "config.yaml")
    shutil.rmtree(run)
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r is not victim))
    run_cfg.train.checkpoint_every = 10
    train(run_cfg, stop_at=20, quiet=True)  # a sweep stopped in the middle of this run
    assert not any(m.get("step", 0) > 20 for m in rows(run / "metrics.jsonl"))
    run_sweep(cfg, out)
    assert "resuming" in capsys.readouterr().err
    again = next(r for r in rows(out / "sweep.jsonl") if r["name"] == victim["name"])
    assert again["loss"] == victim["loss"]  # bit for bit: the resumed run is the run that never stopped


def test_print_commands_then_collect(tmp_path):
    from pretrainer.cli import main
    from pretrainer.config import load_config

    cfg = micro_config(tmp_path)
    out = tmp_path / "cluster"
    r = run_sweep(cfg, out, print_commands=True, quiet=True)
    cmds = r["commands"]
    assert len(cmds) == 6 and all(c.startswith("pretrainer pretrain --quiet -c ") for c in cmds)
    assert not (out / "runs").exists() and not (out / "sweep.jsonl").exists()  # nothing trained
    first = load_config(cmds[0].split()[-1])
    assert first.train.max_steps == 31 and first.model.d_model == 16 and first.out.endswith(first.out.split("/")[-1])
    assert main(cmds[0].split()[1:]) == 0  # as a cluster node would run it
    left = run_sweep(cfg, out, print_commands=True, quiet=True)["commands"]
    assert len(left) == 5 and cmds[0] not in left
    assert len(rows(out / "sweep.jsonl")) == 1  # the finished run was collected


def test_lr_search_keeps_the_rate_with_the_lowest_loss(tmp_path):
    cfg = micro_config(tmp_path)
    out = tmp_path / "lr"
    s = run_sweep(cfg, out, quiet=True, sizes="16x1", tokens="4k,8k", lr_search="1e-4,1e-2")
    search = rows(out / "lr_search.jsonl")
    assert len(search) == 2
    best = min(search, key=lambda r: r["loss"])
    main = rows(out / "sweep.jsonl")
    assert {r["lr"] for r in main} == {best["lr"]} and all(r["lr_rule"] == "search" for r in main)
    assert main[0]["lr_search"] == {f"{r['lr']:.3g}": r["loss"] for r in search}
    assert s["lr_search"]["d16-l1"]["lr"] == best["lr"]
    assert s["lr_search"]["d16-l1"]["at_edge"] and any("edge of the candidates" in w for w in s["warnings"])
    # the search run at the best rate is the 4k grid run: trained once
    assert len(list((out / "runs").iterdir())) == 3


def test_pick_rate_takes_the_smallest_of_tied_rates():
    recs = [{"lr": 3e-3, "loss": 2.0512}, {"lr": 7e-3, "loss": 1.9994}, {"lr": 1.5e-2, "loss": 1.9975},
            {"lr": 3e-2, "loss": 2.3666}]
    pick = pick_rate(recs, 0.005)  # 1.9994 is 0.1 % above 1.9975: a tie, the smaller rate is kept
    assert pick["lr"] == 7e-3 and pick["tied"] == [7e-3, 1.5e-2] and not pick["at_edge"]
    assert pick_rate(recs, 0.0)["lr"] == 1.5e-2  # no tolerance: the lowest loss
    assert pick_rate(recs, 0.05)["lr"] == 3e-3 and pick_rate(recs, 0.05)["at_edge"]
    assert list(pick["losses"]) == ["0.003", "0.007", "0.015", "0.03"]


def test_bad_lr_search_tie_is_one_line(tmp_path):
    cfg = micro_config(tmp_path)
    with pytest.raises(ConfigError, match="lr_search_tie 'x'"):
        run_sweep(cfg, tmp_path / "o", quiet=True, sizes="16x1", tokens="4k", lr_search="1e-3,1e-2",
                  lr_search_tie="x")


def test_repeat_data_warning(tmp_path):
    cfg = micro_config(tmp_path, corpus="builtin:synthetic:40")
    out = tmp_path / "small"
    s = run_sweep(cfg, out, quiet=True, sizes="16x1", tokens="8k", evals=2)
    (r,) = rows(out / "sweep.jsonl")
    train_tokens = json.loads((out / "data" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert r["D"] > train_tokens and r["epochs"] > 1
    assert any(w.startswith("repeats data") for w in r["warnings"])
    assert any("repeats data" in w for w in s["warnings"])


def test_tokens_to_reach_interpolates():
    curve = [[0, 6.0], [1000, 4.0], [2000, 3.0], [3000, 2.5], [4000, 2.4]]
    assert tokens_to_reach(curve, 3.5) == pytest.approx(1500)
    assert tokens_to_reach(curve, 3.0) == pytest.approx(2000)
    assert tokens_to_reach(curve, 2.45) == pytest.approx(3500)
    assert tokens_to_reach(curve, 7.0) == 0
    assert tokens_to_reach(curve, 2.0) is None


def test_isoflop_parabola_minimum():
    N = np.logspace(4, 6, 7)
    L = 2.0 + 0.3 * (np.log(N) - math.log(1e5)) ** 2
    m = isoflop_minimum(N, L)
    assert m["N_opt"] == pytest.approx(1e5, rel=1e-6) and m["loss_min"] == pytest.approx(2.0)
    assert m["inside_range"]
    assert isoflop_minimum(N, -L) is None  # no minimum
    assert isoflop_minimum(N[:2], L[:2]) is None


def test_late_drop():
    flat = [(s, 2.0) for s in range(1, 101)]
    assert late_drop(flat, 100) == 0
    falling = [(s, 3.0 - 0.01 * s) for s in range(1, 101)]  # 2.25 -> 2.05
    assert late_drop(falling, 100) == pytest.approx((2.245 - 2.045) / 2.045)
    assert late_drop([(1, 3.0)], 100) is None


def test_plan_sizes_rates_and_isoflop(tmp_path):
    cfg = micro_config(tmp_path)
    base, raw = load_base(cfg)
    base.model.vocab_size, base.data = 50, "unused"
    assert parse_count("1.5M") == 1.5e6 and parse_count("500k") == 5e5 and parse_count(2e6) == 2e6
    sizes = parse_sizes("32x2,64x3x4", base.model)
    assert sizes == [Size(32, 2, 2), Size(64, 3, 4)]  # base head width 16
    with pytest.raises(ConfigError, match="not a multiple of the base head width 16"):
        parse_sizes("24x2", base.model)
    with pytest.raises(ConfigError, match="WIDTHxDEPTH"):
        parse_sizes("big", base.model)
    opts = _options(raw, {"lr_scaling": "mup", "base_width": 32, "sizes": "16x1,32x2,64x2"})
    specs, search = plan_sweep(base, tmp_path, opts)
    assert not search
    for s in specs:
        assert s.lr == pytest.approx(3e-3 * 32 / s.size.d_model) and s.lr_rule == "mup"
    opts = _options(raw, {"tokens": None, "isoflop": "2e9,4e9", "sizes": "16x1,32x2,64x2", "min_steps": 10})
    specs, _ = plan_sweep(base, tmp_path, opts)
    assert {s.c_target for s in specs} == {2e9, 4e9}
    for s in specs:
        assert s.role == "isoflop" and s.steps >= 10
        assert 6 * s.N * s.tokens == pytest.approx(s.c_target, rel=0.05)  # D = C / 6N up to a step
    with pytest.raises(ConfigError, match="one of the two"):
        _options({}, {"isoflop": "1e12", "tokens": "1M"})


def known_sweep_folder(folder):
    """A sweep folder with a known law: its rows have every field a sweep writes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    with open(folder / "sweep.jsonl", "w") as f:
        for n in np.logspace(5, 8, 6):
            for d in np.logspace(8, 10, 4):
                loss = (1.8 + 400 / n ** 0.35 + 1200 / d ** 0.3) * math.exp(rng.normal(0, 0.005))
                f.write(json.dumps({"name": f"n{n:.0f}-d{d:.0f}", "N": n, "D": d, "C": 6 * n * d, "loss": loss,
                                    "curve": [[0, 6.0], [d, loss]], "warnings": [], "lr": 1e-3}) + "\n")
    return folder


def test_fit_and_plan_read_a_sweep_folder(micro, tmp_path, capsys):
    from pretrainer.cli import main

    _, out, _ = micro
    assert main(["scaling", "fit", str(out), "--form", "kaplan", "--json", "--bootstrap", "10"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["form"] == "kaplan" and r["n_points"] == 6 and "N" in r["laws"]

    folder = known_sweep_folder(tmp_path / "known")
    assert main(["scaling", "fit", str(folder), "--json", "--bootstrap", "20"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["form"] == "chinchilla" and abs(fit["params"]["alpha"] - 0.35) < 0.05
    assert main(["scaling", "plan", str(folder), "--compute", "1e20", "--json", "--bootstrap", "20"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["ours"]["N"] > 0 and (folder / "plan.png").is_file()


def test_fit_bootstrap_shows_progress_on_stderr(tmp_path, capsys, monkeypatch):
    """Resamples done, rate and eta on stderr (every resample here: no wait before the first
    line); --json: stdout is the JSON object and stderr stays empty."""
    import pretrainer.progress
    from pretrainer.cli import main

    folder = known_sweep_folder(tmp_path / "known")
    assert main(["scaling", "fit", str(folder), "--json", "--bootstrap", "8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["form"] == "chinchilla" and err == ""
    monkeypatch.setattr(pretrainer.progress, "FIRST", 0.0)
    monkeypatch.setattr(pretrainer.progress, "EVERY", 0.0)
    assert main(["scaling", "fit", str(folder), "--bootstrap", "8"]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"Chinchilla fit bootstrap: {i}/8 resamples" for i in range(1, 9)]
    assert all(" resamples/s, " in line and ", eta " in line for line in lines)
    assert out.startswith("chinchilla fit of 24 points") and "resamples" not in out


def test_sweep_runs_show_step_progress(tmp_path, capsys, monkeypatch):
    """A line per sweep run while it trains: steps done of its total, loss, elapsed, eta; read from
    the run's metrics.jsonl, so the same for a run in this process and in a child process."""
    import re
    from types import SimpleNamespace

    from pretrainer.scaling import sweep
    from pretrainer.scaling.sweep import RunWatch

    monkeypatch.setattr(sweep, "WATCH_EVERY", 0.0)
    out = tmp_path / "one"
    run_sweep(micro_config(tmp_path), out, sizes="16x1", tokens="8k")
    err = capsys.readouterr().err
    steps = [int(m) for m in re.findall(r"d16-l1-\S+: step (\d+)/62 \(\d+%\), loss \d+\.\d{4}, \d+ s, eta ", err)]
    assert steps and steps == sorted(steps) and steps[-1] <= 62, err

    # a child process's run: the watch reads the same file (here the finished run)
    rec = rows(out / "sweep.jsonl")[0]
    said = []
    spec = SimpleNamespace(name=rec["name"], steps=62, cfg=SimpleNamespace(out=str(out / rec["run"])))
    RunWatch(spec, 0, said.append, every=0.0).poll()
    last = [m for m in rows(out / rec["run"] / "metrics.jsonl") if "loss" in m][-1]
    assert len(said) == 1 and f"step {last['step']}/62 (" in said[0] and f"loss {last['loss']:.4f}" in said[0]


def test_cli_bad_sizes_is_one_line(tmp_path):
    cfg = micro_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pretrainer", "scaling", "sweep", cfg, "--out", str(tmp_path / "x"),
                        "--sizes", "32y2"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "32y2" in r.stderr


def test_jobs_train_in_child_processes(tmp_path):
    cfg = micro_config(tmp_path)
    out = tmp_path / "jobs"
    s = run_sweep(cfg, out, quiet=True, sizes="16x1", tokens="4k,8k", jobs=2, threads=1)
    recs = rows(out / "sweep.jsonl")
    assert s["n_runs"] == 2 and {r["steps"] for r in recs} == {31, 62}
    for r in recs:
        assert (out / "logs" / f"{r['name']}.log").is_file() and r["wall_s"] > 0
        assert r["loss"] == rows(out / r["run"] / "metrics.jsonl")[-1]["val_loss"]


@pytest.mark.slow
def test_acceptance_sweep_on_the_embedded_corpus(tmp_path):
    """Issue 5: 5 sizes x 4 budgets on builtin:stdlib (configs/sweep-stdlib.yaml), about 20 minutes
    on 2 cores: loss falls with N at every D, L(N) has R² >= 0.95, a plan, and larger models need
    fewer tokens to reach the same loss."""
    from pretrainer.config import CONFIG_DIR

    s = run_sweep(str(CONFIG_DIR / "sweep-stdlib.yaml"), tmp_path / "sweep", quiet=True)
    assert s["n_runs"] == 20
    Ns = [r["N"] for r in s["records"]]
    assert max(Ns) / min(Ns) >= 30
    assert all(s["loss_falls_with_N_at_fixed_D"].values())
    assert s["L_of_N"]["r2"] >= 0.95 and s["L_of_N"]["alpha_N"] > 0
    assert s["plan"]["ours"] is not None or s["plan"]["flags"]["reasons"]
    assert all(s["sample_efficiency"]["larger_needs_fewer"].values())


def test_sample_efficiency_on_hand_made_curves():
    from pretrainer.scaling.sweep import sample_efficiency

    def rec(N, curve):
        return {"name": f"n{N}", "N": N, "d_model": N, "n_layer": 1, "D": curve[-1][0], "curve": curve}

    small = rec(10, [[0, 5.0], [100, 3.0], [200, 2.5], [400, 2.2]])
    big = rec(100, [[0, 5.0], [100, 2.5], [200, 2.0], [400, 1.8]])
    se = sample_efficiency([big, small])
    assert se["targets"][-1] == 2.2  # the lowest loss every size reaches
    assert se["sizes"][0]["N"] == 10 and se["sizes"][0]["tokens_to_target"]["2.2"] == pytest.approx(400)
    assert se["sizes"][1]["tokens_to_target"]["2.2"] == pytest.approx(160)  # 2.5 -> 2.0 between 100 and 200
    assert all(se["larger_needs_fewer"].values()) and se["log_tokens_vs_log_N_slope"]["2.2"] < 0
    se = sample_efficiency([big, small], targets=[3.0])
    assert se["sizes"][0]["tokens_to_target"]["3"] == pytest.approx(100)
    assert se["sizes"][1]["tokens_to_target"]["3"] == pytest.approx(20 + 60)  # 5.0 -> 2.5 between 0 and 100


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_diverging_rate_candidate_is_recorded_and_the_sweep_goes_on(tmp_path, jobs):
    """A learning rate so large that the run's divergence guard stops it (train.lr=1e4) is a
    search candidate with an infinite loss, not the end of the sweep: the finite rate is kept."""
    cfg = micro_config(tmp_path)
    out = tmp_path / "div"
    s = run_sweep(cfg, out, quiet=True, sizes="16x1", tokens="4k", lr_search="1e-2,1e4", jobs=jobs, threads=1)
    search = {r["lr"]: r for r in rows(out / "lr_search.jsonl")}
    assert search[1e4]["diverged"] and search[1e4]["loss"] == float("inf")
    assert any("diverged" in w for w in search[1e4]["warnings"])
    assert s["lr_search"]["d16-l1"]["lr"] == 1e-2 and s["n_runs"] == 1
