"""Experiment tracking (issue 19): ``train.loggers`` sends every scalar of ``metrics.jsonl`` to
TensorBoard under the same names and steps; read back with TensorBoard's own event reader, the
curves equal the file, also after a resume that dropped lines logged past its checkpoint."""

import json
import shutil

import pytest

from pretrainer.errors import ConfigError
from pretrainer.train.checkpoint import list_checkpoints
from pretrainer.train.tracking import parse_loggers, scalars
from pretrainer.train.trainer import resume_config, train
from test_train import tiny_cfg


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step logged twice (not purged)"
        out[tag] = {e.step: e.value for e in events}
    return out


def jsonl_scalars(run) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in scalars(record).items():
            out.setdefault(name, {})[record["step"]] = value
    return out


def test_tensorboard_scalars_equal_metrics_jsonl_also_after_a_resume(synthetic_data, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cfg = tiny_cfg(synthetic_data, run, max_steps=20, log_every=2, eval_every=5, checkpoint_every=5,
                   loggers="jsonl,tensorboard")
    train(cfg, stop_at=12, quiet=True)  # steps 11 and 12 logged, then a checkpoint at 12 ...
    shutil.rmtree(list_checkpoints(run)[-1])  # ... that was lost: the resume starts from step 10
    train(resume_config(run), resume=True, quiet=True)
    expected, got = jsonl_scalars(run), tensorboard_scalars(run / "tensorboard")
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "val_ppl"} <= set(expected)
    assert set(got) == set(expected)
    for tag in expected:
        assert sorted(got[tag]) == sorted(expected[tag]), tag  # one value per step: 11, 12 replaced
        for step, value in expected[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)


def test_logger_names_are_checked():
    assert parse_loggers("tensorboard") == ["jsonl", "tensorboard"]
    assert parse_loggers("jsonl, wandb,tensorboard") == ["jsonl", "wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'"):
        parse_loggers("jsonl,mlflow")
    from pretrainer.config import load_config

    with pytest.raises(ConfigError, match=r"train.loggers='mlflow'"):
        load_config(None, ["train.loggers=[jsonl,mlflow]", "data=x", "out=y"]).validate()
    assert load_config(None, ["train.loggers=[jsonl,tensorboard]"]).train.loggers == "jsonl,tensorboard"


def test_fine_tuning_sends_its_scalars_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from pretrainer.finetune.runner import finetune
    from test_finetune_loop import setup

    run = tmp_path / "ft"
    finetune(out=str(run), loggers="jsonl,tensorboard", **dict(setup(tmp_path), epochs=2))
    expected, got = jsonl_scalars(run), tensorboard_scalars(run / "tensorboard")
    assert {"loss", "accuracy", "eval_loss"} <= set(expected) and set(got) == set(expected)
    for tag in expected:
        assert got[tag] == pytest.approx(expected[tag], rel=1e-6), tag


def test_wandb_gets_the_same_scalars_offline_and_resumes_its_run(synthetic_data, tmp_path, monkeypatch):
    """W&B's calls recorded (a stand-in module, so this runs without wandb installed): the run is
    offline by default, in RUN/wandb, and a resumed run continues the same W&B run id."""
    import sys
    import types

    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=10, log_every=2, eval_every=5, loggers="jsonl,wandb"),
          stop_at=6, quiet=True)
    train(resume_config(run), resume=True, quiet=True)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (run / "wandb_id").read_text().strip()
    assert all(kw["mode"] == "offline" and kw["dir"] == str(run) and kw["resume"] == "allow" for kw in inits)
    assert inits[0]["config"]["train"]["loggers"] == "jsonl,wandb"
    sent: dict[str, dict[int, float]] = {}
    for c in calls:
        if c[0] == "log":
            for k, v in c[2].items():
                sent.setdefault(k, {})[c[1]] = v
    expected = jsonl_scalars(run)
    assert set(sent) == set(expected)
    for tag in expected:
        assert sent[tag] == pytest.approx(expected[tag], rel=1e-6), tag


def test_a_real_offline_wandb_run_writes_its_files(synthetic_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(tiny_cfg(synthetic_data, run, max_steps=4, log_every=2, eval_every=0, loggers="wandb"), quiet=True)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_logger_that_is_not_installed_is_a_one_line_error_before_training(synthetic_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"names tensorboard, which is not installed; pip install "
                                          r"'pretrainer\[tensorboard\]'"):
        train(tiny_cfg(synthetic_data, tmp_path / "run", loggers="tensorboard"), quiet=True)
    assert not (tmp_path / "run").exists()
