"""Issue 20, checkpoints and run folders: checksummed checkpoints that every reader verifies
(a damaged newest one is skipped, with a warning, for the newest intact one, and a resumed run
continues bit for bit from it), failed saves cleaned up at the next start, one writer per folder."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrainer import load
from pretrainer.config import RunConfig
from pretrainer.errors import CheckpointError
from pretrainer.runlock import RunLock, RunLocked
from pretrainer.train.checkpoint import (latest_checkpoint, list_checkpoints, sha256_file, verify_checkpoint,
                                         write_safetensors)
from pretrainer.train.trainer import resume_config, train
from test_train import logged, tiny_cfg as train_cfg

HELPERS = Path(__file__).parent / "helpers"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tiny_cfg(data, out, **train_kw) -> RunConfig:
    """test_train's run (gpt-nano with dropout, so exact resume needs the RNG state), 20 steps."""
    return train_cfg(data, out, **{"max_steps": 20, **train_kw})


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def finished(synthetic_data, tmp_path_factory) -> Path:
    """A 20-step run with checkpoints at steps 10 and 20."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    train(tiny_cfg(synthetic_data, run), quiet=True)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010", "step_00000020"]
    return run


# ----------------------------------------------------------------------------------------------
# Checksums written with the files


def test_safetensors_are_hashed_as_written_and_equal_the_library_bytes(tmp_path):
    """write_safetensors streams the file safetensors itself would write (byte for byte) and the
    SHA-256 it returns is that of the bytes on disk."""
    from safetensors.torch import load_file, save

    tensors = {"b.w": torch.randn(3, 4), "a": torch.arange(5, dtype=torch.uint8), "step": torch.tensor(7.0),
               "d": torch.randn(2, dtype=torch.float64), "e": torch.ones(3, dtype=torch.bfloat16),
               "empty": torch.zeros(0), "big": torch.randn(300_000), "t": torch.randn(4, 5).t()}
    size, sha = write_safetensors(tensors, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save({k: v.contiguous() for k, v in tensors.items()})
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_every_file_of_a_checkpoint_carries_its_sha256(finished):
    ckpt = list_checkpoints(finished)[-1]
    meta = json.loads((ckpt / "state.json").read_text())
    names = sorted(p.name for p in ckpt.iterdir() if p.name != "state.json")
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    assert sorted(meta["sha256"]) == sorted(meta["files"]) == names
    for name in names:
        assert meta["sha256"][name] == sha256_file(ckpt / name)
    assert len(meta["state_sha256"]) == 64


def test_the_dcp_writer_hashes_each_file_as_it_writes_it(tmp_path):
    """The sharded checkpoints' writer (one process, no process group): a digest for every file
    torch.distributed.checkpoint writes, equal to the file's SHA-256."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from pretrainer.train.checkpoint import _hashing_dcp_writer

    written: dict = {}
    state = {"model": {"w": torch.randn(64, 32), "b": torch.randn(32)}, "optimizer": {"step": torch.tensor(3.0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), storage_writer=_hashing_dcp_writer(tmp_path / "dcp", written))
    files = sorted(p for p in (tmp_path / "dcp").iterdir())
    assert sorted(written) == files and any(p.name == ".metadata" for p in files)
    for p in files:
        assert written[p] == (p.stat().st_size, sha256_file(p))


# ----------------------------------------------------------------------------------------------
# A damaged newest checkpoint: every reader warns and takes the previous one


def _damage(kind: str, run: Path) -> None:
    newest = run / "checkpoints" / "step_00000020"
    if kind == "weights":
        f = newest / "model.safetensors"
        flip(f, 8 + header_length(f) + (f.stat().st_size - 8 - header_length(f)) // 2)
    elif kind == "optimizer":
        f = newest / "optimizer.safetensors"
        flip(f, f.stat().st_size - 3)
    elif kind == "header":
        flip(newest / "model.safetensors", 9)  # a character of the JSON header
    elif kind == "state":
        text = (newest / "state.json").read_text()
        (newest / "state.json").write_text(text.replace('"samples": 80', '"samples": 84'))
    elif kind == "state-not-an-object":
        (newest / "state.json").write_text("[1, 2, 3]")
    elif kind == "step-disagrees-with-folder":  # a checkpoint copied under another step's name
        shutil.rmtree(newest)
        shutil.copytree(run / "checkpoints" / "step_00000010", newest)


WHY = {"weights": "SHA-256 differs", "optimizer": "SHA-256 differs", "header": "model.safetensors",
       "state": "do not match their checksum", "state-not-an-object": "not a pretrainer checkpoint",
       "step-disagrees-with-folder": "step 10 disagrees with the folder name step_00000020"}


@pytest.mark.parametrize("kind", list(WHY))
def test_damaged_newest_checkpoint_falls_back_and_the_resumed_run_is_bit_exact(finished, tmp_path, capsys, kind):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _damage(kind, run)
    capsys.readouterr()

    model = load(run)  # pretrainer.load(): a warning on stderr, the previous checkpoint's weights
    err = capsys.readouterr().err
    assert "warning: skipping broken checkpoint" in err and "step_00000020" in err and WHY[kind] in err, err
    assert "using step_00000010" in err and len(err.strip().splitlines()) == 1
    assert same_weights(model, load(run / "checkpoints" / "step_00000010"))

    summary = train(resume_config(run), resume=True, quiet=True)  # resume: from step 10 to 20 again
    err = capsys.readouterr().err
    assert "skipping broken checkpoint" in err and WHY[kind] in err and "using step_00000010" in err
    assert summary["step"] == 20
    assert logged(run) == logged(finished)  # bit for bit the losses of the run that never broke
    assert logged(run, "val_loss") == logged(finished, "val_loss")
    verify_checkpoint(run / "checkpoints" / "step_00000020")  # rewritten intact


def test_generate_export_and_evaluate_warn_and_use_the_previous_checkpoint(finished, tmp_path, capsys):
    from safetensors.torch import load_file

    from pretrainer.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _damage("weights", run)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    assert "skipping broken checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--max-batches", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping broken checkpoint") == 1, err
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "skipping broken checkpoint" in capsys.readouterr().err
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    ref = load(run / "checkpoints" / "step_00000010").state_dict()
    assert torch.equal(exported["transformer.wte.weight"], ref["tok_emb.weight"])


def test_checkpoints_without_checksums_still_load_and_a_damaged_header_falls_back(finished, tmp_path, capsys):
    """Checkpoints written before checksums (no sha256 in state.json): sizes and safetensors
    headers are checked, nothing is said when they hold."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ckpt in list_checkpoints(run):
        meta = json.loads((ckpt / "state.json").read_text())
        del meta["sha256"], meta["state_sha256"]
        (ckpt / "state.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert latest_checkpoint(run)[0].name == "step_00000020"
    assert capsys.readouterr().err == ""
    f = run / "checkpoints" / "step_00000020" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (header_length(f) + 8).to_bytes(8, "little")  # a header length that overruns its JSON
    f.write_bytes(bytes(data))
    assert latest_checkpoint(run)[0].name == "step_00000010"
    assert "damaged safetensors header" in capsys.readouterr().err


def test_every_checkpoint_broken_is_one_line_error(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ckpt in list_checkpoints(run):
        flip(ckpt / "rng.safetensors", (ckpt / "rng.safetensors").stat().st_size - 1)
    with pytest.raises(CheckpointError, match="every checkpoint is broken"):
        load(run, warn=lambda s: None)


# ----------------------------------------------------------------------------------------------
# A kill inside the first save


def test_a_kill_inside_the_first_save_leaves_a_folder_a_fresh_start_accepts(synthetic_data, tmp_path):
    from pretrainer.cli import main

    run = tmp_path / "run"
    overrides = ["model=gpt-nano", f"data={synthetic_data}", f"out={run}", "train.max_steps=4",
                 "train.seq_len=32", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=0",
                 "train.plot=false"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"overrides": overrides, "kill_at_save": 2}]))
    done = subprocess.run([sys.executable, str(HELPERS / "dist_worker.py"), str(spec)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list_checkpoints(run) == []
    assert [p.name.split("-")[1] for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # .tmp-step_...

    with pytest.raises(CheckpointError, match="nothing to resume .* without --resume"):
        train(resume_config(run), resume=True, quiet=True)
    assert list((run / "checkpoints").iterdir()) == []  # the next start removed the failed save
    assert main(["pretrain", *overrides]) == 0  # a fresh start: the folder counts as empty
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


# ----------------------------------------------------------------------------------------------
# One run, one writer


def test_the_lock_names_its_holder_and_a_dead_holder_does_not_block(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder) as lock:
        lock.acquire()
        with pytest.raises(RunLocked, match=rf"in use by another run \(pid {os.getpid()} on "
                                            rf"{socket.gethostname()} since "):
            RunLock(folder).acquire()
    assert not folder.exists()  # created for the lock alone: removed with it

    # a holder killed with SIGKILL leaves its lock file, which blocks nobody
    code = (f"import os, signal; from pretrainer.runlock import RunLock; "
            f"RunLock({str(folder)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert json.loads((folder / ".lock").read_text())["pid"] != os.getpid()
    with RunLock(folder) as lock:
        lock.acquire()
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


def test_fine_tuning_and_sweeps_lock_their_folder(tmp_path):
    from pretrainer.finetune.runner import finetune
    from pretrainer.scaling.sweep import run_sweep

    with RunLock(tmp_path / "ft") as lock:
        lock.acquire()
        with pytest.raises(RunLocked, match="in use by another fine-tuning run"):
            finetune("gpt-nano", "classification", "rows.csv", str(tmp_path / "ft"), from_scratch=True, quiet=True)
    config = tmp_path / "sweep.yaml"
    config.write_text("model: {preset: gpt-nano}\nsweep: {sizes: 16x1, tokens: 4k}\n")
    with RunLock(tmp_path / "sw") as lock:
        lock.acquire()
        with pytest.raises(RunLocked, match="in use by another sweep"):
            run_sweep(str(config), tmp_path / "sw", quiet=True)


def test_a_second_pretrain_on_a_live_run_is_refused_and_the_first_finishes_intact(synthetic_data, tmp_path):
    run = tmp_path / "run"
    args = ["model=gpt-nano", f"data={synthetic_data}", "train.max_steps=100000", "train.seq_len=32",
            "train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=5",
            "train.plot=false"]
    first = subprocess.Popen([sys.executable, "-m", "pretrainer", "pretrain", *args, f"out={run}"],
                             env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:  # training is under way: the lock is held
            if line.startswith("step") and "/100000" in line:
                break
        holder = rf"in use by another run \(pid {first.pid} on {socket.gethostname()} since "
        for cmd in (["pretrain", *args, f"out={run}"], ["pretrain", "--resume", str(run)]):
            second = subprocess.run([sys.executable, "-m", "pretrainer", *cmd], env=ENV,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode != 0
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and _search(holder, lines[0]), second.stderr
        first.send_signal(signal.SIGINT)  # the first stops cleanly, with a checkpoint
        rest = first.stderr.read()
        assert first.wait(timeout=120) == 75, rest  # stopped by a signal, resumable (EX_TEMPFAIL)
    finally:
        if first.poll() is None:
            first.kill()
    ckpt, meta = latest_checkpoint(run)
    steps = sorted(logged(run))
    assert steps == list(range(1, meta["step"] + 1))  # one writer's lines, in order


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP2 on two processes): one torchrun launch


def test_sharded_checkpoints_carry_checksums_and_all_processes_agree_on_the_lock(synthetic_data, tmp_path):
    from test_parallel import COMMON, MODELS, torchrun

    run, locked = tmp_path / "fsdp", tmp_path / "locked"
    base = MODELS["gpt-nano"] + COMMON + [f"data={synthetic_data}", "train.batch_size=4", "train.parallel=fsdp"]
    with RunLock(locked) as lock:
        lock.acquire()
        done = torchrun([{"overrides": base + [f"out={run}"]}, {"overrides": base + [f"out={locked}"]}],
                        tmp_path, check=False)
    # the second run: both processes refuse with the same line (and neither hangs)
    refusal = f"RunLocked: {locked}: in use by another run (pid {os.getpid()} on {socket.gethostname()}"
    assert done.returncode != 0 and done.stderr.count(refusal) == 2, done.stderr[-3000:]

    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000006"
    meta = verify_checkpoint(newest)
    files = {str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()} - {"state.json"}
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_rank0.safetensors",
            "rng_rank1.safetensors"} == files == set(meta["sha256"])
    for name, sha in meta["sha256"].items():
        assert sha256_file(newest / name) == sha

    flip(newest / "dcp" / "__1_0.distcp", (newest / "dcp" / "__1_0.distcp").stat().st_size // 2)
    said = []
    assert latest_checkpoint(run, warn=said.append)[0].name == "step_00000003"
    assert len(said) == 1 and "__1_0.distcp: SHA-256 differs" in said[0] and "using step_00000003" in said[0]
    assert same_weights(load(run, warn=lambda s: None), load(run / "checkpoints" / "step_00000003"))
