"""Fine-tuning and sweep settings are typed sections of the one configuration system: each option
declared once (pretrainer.config), its CLI flag derived from it, YAML sections and key=value
overrides type-checked with the closest key suggested."""

import argparse
import dataclasses

import pytest

from pretrainer.cli import add_section_flags, build_parser, main
from pretrainer.config import FinetuneConfig, SweepConfig, section
from pretrainer.errors import ConfigError


@pytest.mark.parametrize("cls,command", [(FinetuneConfig, ["finetune"]), (SweepConfig, ["scaling", "sweep"])])
def test_every_option_has_its_derived_flag(cls, command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    flags = {opt for action in sub._actions for opt in action.option_strings}
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_derived_flags_are_typed_and_default_to_not_given():
    p = argparse.ArgumentParser()
    add_section_flags(p, FinetuneConfig)
    args = p.parse_args(["--batch-size", "8", "--lr", "3e-4", "--from-scratch", "--select", "loss"])
    assert args.batch_size == 8 and args.lr == 3e-4 and args.from_scratch is True and args.select == "loss"
    assert args.epochs is None and args.quiet is None  # not given: a file's value would stand
    with pytest.raises(SystemExit):
        p.parse_args(["--select", "best"])


def test_sections_check_types_and_suggest_keys():
    assert section(SweepConfig, {"sizes": "32x2", "jobs": 2}, "sweep").jobs == 2
    with pytest.raises(ConfigError, match="unknown key 'job' .*did you mean 'jobs'"):
        section(SweepConfig, {"job": 2}, "base.yaml sweep")
    with pytest.raises(ConfigError, match="evals='many': expected an integer"):
        section(SweepConfig, {"evals": "many"}, "sweep")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        section(FinetuneConfig, {"batch_sise": 8}, "ft.yaml")


def test_finetune_reads_a_yaml_section_then_flags_then_set(tmp_path, capsys):
    from pretrainer.finetune.cli import finetune_options

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("finetune:\n  epochs: 7\n  lr: 0.002\n  batch_size: 4\n")
    p = build_parser()
    args = p.parse_args(["finetune", "bert-tiny", "--task", "classification", "--train", "x", "--out", "o",
                         "-c", str(cfg), "--lr", "0.003", "--set", "batch_size=2"])
    opts = finetune_options(args)
    assert (opts["epochs"], opts["lr"], opts["batch_size"]) == (7, 0.003, 2)
    code = main(["finetune", "bert-tiny", "--task", "classification", "--train", "x", "--out", str(tmp_path / "o"),
                 "--set", "batch_sise=2"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'batch_size'" in err and len(err.strip().splitlines()) == 1
