"""Issue 20, check 1 (slow): 20 SIGKILLs, 15 at random moments of one run's life and 5 inside the
first checkpoint save (each file half written, before state.json, before the rename). After every
kill the folder is resumable (``--resume``, or a fresh start when no checkpoint survived), and
every run ends with weights and logged losses bit for bit those of a run never killed. And a
fine-tune SIGKILLed after its first epoch resumes to the metrics of one never killed.

    pytest -m slow tests/test_reliability_kills.py
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrainer.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

HELPERS = Path(__file__).parent / "helpers"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
LONG, SHORT = 1200, 60  # steps of the run killed at random moments, and of the first-save ones


def overrides(data: Path, out: Path, steps: int) -> list[str]:
    # dropout, so that an exact resume also needs the RNG state; a checkpoint every 6 steps (~0.1 s)
    return ["model=gpt-nano", "model.dropout=0.1", f"data={data}", f"out={out}", f"train.max_steps={steps}",
            "train.batch_size=4", "train.seq_len=32", "train.lr=3e-3", "train.warmup_steps=10",
            "train.checkpoint_every=6", "train.keep_checkpoints=2", "train.eval_every=30",
            "train.eval_batches=2", "train.log_every=1", "train.plot=false"]


def pretrain(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrainer", "pretrain", "--quiet", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go_on(data: Path, run: Path, steps: int) -> subprocess.Popen:
    """What an operator does after a kill: resume, or start afresh when no checkpoint survived."""
    return pretrain(["--resume", str(run)] if list_checkpoints(run) else overrides(data, run, steps))


def finish(data: Path, run: Path, steps: int) -> None:
    p = go_on(data, run, steps)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err


def outcome(run: Path, steps: int) -> tuple[dict, dict]:
    final = list_checkpoints(run)[-1]
    assert final.name == f"step_{steps:08d}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if k in r}
    return load_file(str(final / "model.safetensors")), losses


def assert_same(run: Path, reference: tuple[dict, dict], steps: int) -> None:
    weights, losses = outcome(run, steps)
    assert weights.keys() == reference[0].keys()
    assert all(torch.equal(weights[k], reference[0][k]) for k in weights), f"{run}: weights differ"
    assert losses.keys() == reference[1].keys(), f"{run}: other log lines"
    # training losses are averaged over the logging window in another order after a resume: 1 ulp
    assert all(losses[k] == pytest.approx(reference[1][k], rel=1e-6, abs=0) for k in losses), f"{run}: losses differ"


def reference(data: Path, folder: Path, steps: int) -> tuple[tuple[dict, dict], float, float]:
    """The run never killed: its outcome, the seconds until its first checkpoint (start-up) and in all."""
    run = folder / "reference"
    started = time.monotonic()
    p = go_on(data, run, steps)
    while not list_checkpoints(run) and p.poll() is None:
        time.sleep(0.02)
    first = time.monotonic() - started
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return outcome(run, steps), first, time.monotonic() - started


@pytest.fixture(scope="module")
def short_reference(synthetic_data, tmp_path_factory):
    return reference(synthetic_data, tmp_path_factory.mktemp("kills"), SHORT)[0]


def test_fifteen_kills_at_random_moments_resume_bit_exact(synthetic_data, tmp_path):
    ref, start_up, seconds = reference(synthetic_data, tmp_path, LONG)
    run = tmp_path / "run"
    rng = random.Random(20)
    kills = []
    for _ in range(15):
        p = go_on(synthetic_data, run, LONG)
        # anywhere from the middle of start-up to a tenth of the training (steps, saves, evaluations)
        time.sleep(rng.uniform(start_up / 2, start_up + (seconds - start_up) / 10))
        assert p.poll() is None, "the run finished before 15 kills; make it longer"
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(list_checkpoints(run)[-1].name if list_checkpoints(run) else None)
    assert len(set(kills)) >= 5, f"the kills hit too few moments of the run: {kills}"
    finish(synthetic_data, run, LONG)
    assert_same(run, ref, LONG)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("where", ["model", "optimizer", "rng", "state", "rename"])
def test_a_kill_inside_the_first_save_leaves_a_folder_that_restarts_bit_exact(synthetic_data, tmp_path,
                                                                              short_reference, where):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(HELPERS / "kill_worker.py"), where, *overrides(synthetic_data, run, SHORT)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list_checkpoints(run) == []
    assert [p.name.split("-")[1] for p in (run / "checkpoints").iterdir()] == ["step_00000006"]
    finish(synthetic_data, run, SHORT)  # no checkpoint: a fresh start, which the folder accepts
    assert_same(run, short_reference, SHORT)


def test_a_fine_tune_killed_after_its_first_epoch_resumes_to_the_same_metrics(tmp_path):
    """Check 6: SIGKILL once epoch 1's training state is saved; ``finetune --resume`` ends with the
    metrics (every logged loss and score) and predictions of a run never killed."""
    from test_finetune import sentiment_tsv
    from pretrainer.tokenization import Tok

    train = sentiment_tsv(tmp_path / "train.tsv", 480, 1)
    dev = sentiment_tsv(tmp_path / "dev.tsv", 64, 2)
    texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
    Tok.train(texts, "wordpiece", 120).save(tmp_path / "tok")

    def finetune(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pretrainer", "finetune", "bert-tiny", "--from-scratch", "--task", "classification",
             "--train", str(train), "--eval", str(dev), "--tokenizer", str(tmp_path / "tok"), "--epochs", "3",
             "--batch-size", "16", "--lr", "2e-3", "--max-len", "16", "--seed", "3", "--log-every", "1",
             "--out", str(out), "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole = finetune(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    part = finetune(tmp_path / "part")
    while not list_checkpoints(tmp_path / "part" / "resume") and part.poll() is None:
        time.sleep(0.01)
    assert part.poll() is None, "the fine-tune finished before the kill; give it more data"
    part.send_signal(signal.SIGKILL)
    part.wait()
    killed_at = json.loads((list_checkpoints(tmp_path / "part" / "resume")[-1] / "state.json").read_text())
    assert killed_at["epoch"] <= 2
    resumed = subprocess.run([sys.executable, "-m", "pretrainer", "finetune", "--resume", str(tmp_path / "part"),
                              "--quiet"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    a, b = read(tmp_path / "whole"), read(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and not k.endswith("_per_s"):  # speeds are the machine's
                assert y[k] == pytest.approx(x[k], rel=1e-6), (x["step"], k)
    pred = lambda run: (run / "predictions.jsonl").read_text()
    assert pred(tmp_path / "part") == pred(tmp_path / "whole")
