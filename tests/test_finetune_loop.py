"""Fine-tuning runs through the trainer's optimizer step: it resumes mid-epoch with the losses and
scores of a run that never stopped, and two processes (DDP over gloo) give one process's run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pretrainer.finetune.runner import finetune, resume_finetune
from test_finetune import sentiment_tsv

WORKER = Path(__file__).parent / "helpers" / "finetune_worker.py"


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def setup(tmp_path):
    from pretrainer.tokenization import Tok

    train = sentiment_tsv(tmp_path / "train.tsv", 96, 1)
    dev = sentiment_tsv(tmp_path / "dev.tsv", 32, 2)
    texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
    Tok.train(texts, "wordpiece", 120).save(tmp_path / "tok")  # one tokenizer for every run
    return dict(source="bert-tiny", task="classification", train=str(train), eval=str(dev),
                from_scratch=True, tokenizer=str(tmp_path / "tok"), epochs=3, batch_size=16,
                lr=2e-3, max_len=16, seed=3, quiet=True, log_every=1, device="cpu")


def test_a_stopped_fine_tuning_run_resumes_with_the_same_numbers(tmp_path, capsys):
    from pretrainer.finetune.predict import Predictor

    kw = setup(tmp_path)
    whole = finetune(out=str(tmp_path / "whole"), **kw)
    stopped = finetune(out=str(tmp_path / "part"), stop_at=8, **kw)  # mid-epoch 2 (6 steps an epoch)
    assert stopped["stopped_at_step"] == 8
    assert not (tmp_path / "part" / "predictions.jsonl").exists()
    capsys.readouterr()
    Predictor(tmp_path / "part")  # predicting with an unfinished run works, and says so
    assert "the fine-tuning did not finish" in capsys.readouterr().err
    resumed = resume_finetune(str(tmp_path / "part"), quiet=True)
    Predictor(tmp_path / "part")
    assert "did not finish" not in capsys.readouterr().err
    a, b = lines(tmp_path / "whole"), lines(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose([r.get("loss", r.get("accuracy")) for r in a],
                               [r.get("loss", r.get("accuracy")) for r in b], rtol=1e-6)
    assert resumed["accuracy"] == whole["accuracy"] and resumed["epoch"] == whole["epoch"]
    assert (tmp_path / "part" / "predictions.jsonl").read_text() == (tmp_path / "whole" / "predictions.jsonl").read_text()


def test_fine_tuning_on_two_processes_matches_one(tmp_path):
    """Without dropout (each process draws its own masks for its half of a batch)."""
    kw = dict(setup(tmp_path), dropout=0.0)
    one = finetune(out=str(tmp_path / "one"), **kw)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(kw, out=str(tmp_path / "two"))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(spec)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = lines(tmp_path / "one"), lines(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r],
                               rtol=1e-5)
    assert [r.get("accuracy") for r in a] == [r.get("accuracy") for r in b]
    summary = json.loads(json.dumps(one))
    assert summary["accuracy"] == [r for r in b if "accuracy" in r][summary["epoch"] - 1]["accuracy"]


def test_gradient_accumulation_gives_the_same_fine_tuning_steps(tmp_path):
    """--grad-accum 3 splits every batch into micro-steps: the same losses (examples weighted
    alike), without dropout."""
    kw = dict(setup(tmp_path), dropout=0.0, epochs=1)
    finetune(out=str(tmp_path / "one"), **kw)
    finetune(out=str(tmp_path / "accum"), grad_accum=3, **kw)
    a, b = lines(tmp_path / "one"), lines(tmp_path / "accum")
    np.testing.assert_allclose([r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r],
                               rtol=1e-5)
