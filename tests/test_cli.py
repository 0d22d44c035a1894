"""The command line: bad input is one line and a non-zero exit; the configs under configs/ load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrainer.cli import main
from pretrainer.config import load_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pretrainer", *args], capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(result, *needles):
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_validate(config):
    path = REPO / "configs" / config
    if "sweep" in (yaml.safe_load(path.read_text()) or {}):  # a base run config plus a 'sweep:' section
        from pretrainer.scaling.sweep import _options, load_base, parse_sizes

        cfg, sweep = load_base(str(path))
        parse_sizes(_options(sweep, {})["sizes"], cfg.model)
        cfg.validate(need_paths=False)
        return
    cfg = load_config(str(path))
    cfg.validate()


def test_info_json_reports_published_counts():
    out = run_cli("info", "gpt2-small", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["params"], info["params_non_embedding"]) == (124_439_808, 85_056_000)
    out = run_cli("info", "llama2-7b", "--json")
    assert json.loads(out.stdout)["params"] == 6_738_415_616


def test_bad_input_gets_one_line_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(run_cli("prepare", "--corpus", str(empty), "--tokenizer", "char", "--out",
                           str(tmp_path / "d1")), "empty.txt")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    one_line_error(run_cli("prepare", "--corpus", str(binary), "--tokenizer", "char", "--out",
                           str(tmp_path / "d2")), "blob.bin", "not a text file")
    one_line_error(run_cli("prepare", "--corpus", str(tmp_path / "nope"), "--tokenizer", "char",
                           "--out", str(tmp_path / "d3")), "nope")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    one_line_error(run_cli("info", "gpt3-small"), "unknown model preset 'gpt3-small'")
    one_line_error(run_cli("pretrain", "model=gpt-nano", "data=" + str(tmp_path / "missing"),
                           "out=" + str(tmp_path / "r")), "missing")
    one_line_error(run_cli("pretrain", "model=gpt-nano", "train.max_stpes=3"),
                   "train.max_stpes", "did you mean 'train.max_steps'")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: gpt-nano\ntrain:\n  lr: fast\n")
    one_line_error(run_cli("pretrain", "-c", str(cfg)), "bad.yaml", "train.lr='fast'", "expected a number")
    one_line_error(run_cli("generate", str(tmp_path / "no-run")), "no-run")


def test_truncated_checkpoint_is_a_clear_error_for_load(tmp_path, synthetic_data):
    run = tmp_path / "run"
    assert main(["pretrain", "model=gpt-nano", f"data={synthetic_data}", f"out={run}",
                 "train.max_steps=4", "train.seq_len=32", "train.batch_size=2", "train.plot=false",
                 "train.checkpoint_every=0", "--quiet"]) == 0
    (ckpt,) = (run / "checkpoints").iterdir()
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    line = one_line_error(run_cli("generate", str(run), "--prompt", "a"), "truncated")
    assert "every checkpoint is broken" in line or "model.safetensors" in line


def test_generate_and_evaluate_on_a_tiny_run(tmp_path, synthetic_data):
    run = tmp_path / "run"
    assert main(["pretrain", "model=gpt-nano", f"data={synthetic_data}", f"out={run}",
                 "train.max_steps=6", "train.seq_len=32", "train.batch_size=4", "--quiet"]) == 0
    assert (run / "loss.png").stat().st_size > 1000
    out = run_cli("generate", str(run), "--prompt", "the ", "--max-new-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    (sample,) = json.loads(out.stdout)
    assert sample["text"].startswith("the ") and len(sample["text"]) > len("the ")
    out = run_cli("evaluate", str(run), "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["val_loss"] > 0 and abs(res["val_ppl"] - 2.718281828 ** res["val_loss"]) < 1e-6 * res["val_ppl"]
    one_line_error(run_cli("generate", str(run), "--no-repeat-ngram", "-1"), "--no-repeat-ngram: -1: expected an integer >= 0")
    one_line_error(run_cli("generate", str(run), "--beams", "0"), "--beams: 0: expected a positive integer")


def test_kernel_fallback_is_one_warning_line(tmp_path, synthetic_data):
    """Without a C compiler the run goes on with PyTorch ops and says so in one line."""
    import os

    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PRETRAINER_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "pretrainer", "pretrain", "model=gpt-nano",
                          f"data={synthetic_data}", f"out={tmp_path / 'run'}", "train.max_steps=2",
                          "train.seq_len=32", "train.batch_size=4"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if "kernels" in line]
    assert notes == [f"warning: pretrainer: fused CPU kernels unavailable, using PyTorch ops "
                     f"(no C compiler ('{tmp_path / 'no-such-cc'}' not found))"], out.stderr
    assert "UserWarning" not in out.stderr and "(float32)" in out.stderr + out.stdout


def test_config_lists_every_key_with_its_meaning_and_shows_what_a_command_line_resolves_to(capsys):
    import dataclasses

    import yaml

    from pretrainer.config import RunConfig, load_config
    from pretrainer.config import _all_keys

    assert main(["config", "--keys", "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    listed = {k["key"] for k in keys}
    run_sections = ("model.", "train.", "noise.", "electra.", "distill.", "mae.", "gato.")
    top = {f.name for f in dataclasses.fields(RunConfig) if f"{f.name}." not in run_sections}
    assert listed == {k for k in _all_keys() if k.startswith(run_sections) and k not in ("model.moe", "train.lora")} | top
    assert all(k["meaning"] for k in keys), [k["key"] for k in keys if not k["meaning"]]
    assert {"key": "train.lr", "default": 1e-3, "meaning": "peak learning rate"} in keys
    assert main(["config", "model=bert-tiny", "train.lr=3e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(None, ["model=bert-tiny", "train.lr=3e-4"]).to_dict()
    assert main(["config", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
