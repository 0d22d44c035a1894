"""Issue 20, the file system: a full disk, a read-only folder or a file where a folder is expected
gives one line naming the path and what to do, exit status 2, and leaves nothing half-written
(no temporary checkpoint folder, no partial export, data or tokenizer folder); a run stopped by a
full disk resumes once space is freed.

The full and read-only file systems are small tmpfs mounts, made where the platform allows it
(Linux, as root, as in CI containers); elsewhere those tests skip and the faults are injected."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrainer.cli import main
from pretrainer.errors import StorageError, storage, writing_folder
from pretrainer.train import checkpoint
from pretrainer.train.checkpoint import list_checkpoints, verify_checkpoint
from pretrainer.train.trainer import resume_config, train
from test_train import tiny_cfg


def mount_tmpfs(folder: Path, size: str, read_only: bool = False) -> None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs mount needs Linux and root")
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size, read_only=False)``: a fresh tmpfs of that size; unmounted afterwards."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        mount_tmpfs(folder, size, read_only)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------------------------
# Faults injected (every platform)


def test_a_failed_checkpoint_write_leaves_no_temporary_folder_and_names_the_checkpoint(synthetic_data, tmp_path,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    writes = [0]
    real = checkpoint.write_safetensors

    def fill_up(tensors, path):
        writes[0] += 1
        if writes[0] == 5:  # the optimizer state of the second checkpoint
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "write_safetensors", fill_up)
    with pytest.raises(StorageError, match=r"step_00000010: cannot save a checkpoint \(No space left on device\); "
                                           r"the disk is full"):
        train(tiny_cfg(synthetic_data, run, max_steps=20, checkpoint_every=5), quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005"]
    verify_checkpoint(list_checkpoints(run)[-1])
    monkeypatch.setattr(checkpoint, "write_safetensors", real)
    summary = train(resume_config(run), resume=True, quiet=True)  # space freed: it goes on from step 5
    assert summary["step"] == 20


def test_storage_and_writing_folder_remove_what_a_failed_write_added(tmp_path):
    tmp = tmp_path / ".x.tmp"
    with pytest.raises(StorageError, match=r"^out.json: cannot write \(Read-only file system\); the file system is "
                                           r"read-only: choose a writable folder$"):
        with storage("out.json", cleanup=tmp):
            tmp.write_text("half")
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert not tmp.exists()
    # a Rust library (tokenizers) reports the OS error as text
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("old")
    with pytest.raises(StorageError, match=r"kept: cannot export \(No space left on device\)"):
        with writing_folder(kept, "export"):
            (kept / "new.bin").write_text("half")
            raise Exception("No space left on device (os error 28)")
    assert sorted(p.name for p in kept.iterdir()) == ["old.txt"]
    with pytest.raises(StorageError):
        with writing_folder(tmp_path / "fresh", "export"):
            (tmp_path / "fresh").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ValueError):  # anything else passes through untouched
        with storage("x"):
            raise ValueError("a bug")


@pytest.mark.parametrize("argv", [
    "pretrain data={data} out={file}/run model=gpt-nano train.max_steps=2 --quiet",
    "prepare --corpus builtin:synthetic --tokenizer char --out {file}/data",
    "tokenizer train --corpus builtin:synthetic --kind char --out {file}/tok",
])
def test_a_file_where_a_folder_is_expected_is_one_line(argv, synthetic_data, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    status = main(argv.format(data=synthetic_data, file=file).split())
    assert status == 2
    line = one_line_error(capsys)
    assert str(file) in line and ("a file is where a folder is expected" in line or "a file is already there" in line)
    assert file.read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# Real full and read-only file systems (Linux, root)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_when_space_is_freed(synthetic_data, tmp_path,
                                                                                   small_fs, capsys):
    # room for the run folder and two checkpoints, not for the third one's temporary folder
    probe = tmp_path / "probe"
    train(tiny_cfg(synthetic_data, probe, max_steps=2, checkpoint_every=2), quiet=True)
    one = sum(p.stat().st_size for p in list_checkpoints(probe)[0].iterdir())
    fs = small_fs(f"{int(2.5 * one) // 1024 + 96}k")
    run = fs / "run"
    argv = f"pretrain data={synthetic_data} out={run} model=gpt-nano train.max_steps=12 train.batch_size=4 " \
           f"train.seq_len=32 train.checkpoint_every=2 train.keep_checkpoints=2 train.eval_every=0 " \
           f"train.plot=false --quiet"
    assert main(argv.split()) == 2
    line = one_line_error(capsys)
    assert f"{run}/checkpoints/step_" in line and "the disk is full" in line
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    kept = list_checkpoints(run)
    assert len(kept) == 2
    for ckpt in kept:
        verify_checkpoint(ckpt)
    subprocess.run(["mount", "-o", "remount,size=20m", str(fs)], check=True)
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    assert list_checkpoints(run)[-1].name == "step_00000012"


def test_every_writer_on_a_full_disk_is_one_line_and_leaves_nothing(synthetic_data, tmp_path, small_fs, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=2, checkpoint_every=2), quiet=True)
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    fs = small_fs("64k")
    cases = {
        "export": ["export", str(run), "--out", str(fs / "out")],
        "import": ["import", str(hf), "--out", str(fs / "out")],
        "prepare": ["prepare", "--corpus", "builtin:stdlib", "--tokenizer", "char", "--out", str(fs / "out")],
        "tokenizer": ["tokenizer", "train", "--corpus", "builtin:stdlib", "--kind", "bpe", "--vocab-size", "2000",
                      "--out", str(fs / "out")],
    }
    for name, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        line = one_line_error(capsys)
        assert str(fs / "out") in line and "the disk is full" in line, (name, line)
        assert list(fs.iterdir()) == [], (name, list(fs.iterdir()))


def test_a_read_only_folder_is_one_line_for_every_writer(synthetic_data, tmp_path, small_fs, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=2, checkpoint_every=2), quiet=True)
    fs = small_fs("1m", read_only=True)
    cases = {
        "pretrain": f"pretrain data={synthetic_data} out={fs}/run model=gpt-nano train.max_steps=2 --quiet",
        "export": f"export {run} --out {fs}/hf",
        "prepare": f"prepare --corpus builtin:synthetic --tokenizer char --out {fs}/data",
        "tokenizer": f"tokenizer train --corpus builtin:synthetic --kind char --out {fs}/tok",
        "finetune": f"finetune bert-tiny --from-scratch --task classification --train builtin:stdlib-package "
                    f"--out {fs}/ft --quiet",
    }
    for name, argv in cases.items():
        capsys.readouterr()
        assert main(argv.split()) == 2, name
        line = one_line_error(capsys)
        assert str(fs) in line and "read-only" in line, (name, line)
