"""What a user installing the package expects: one version (``pretrainer --version``, the module and
the installed metadata agree), a licence file matching pyproject's, ``py.typed``, and a command line
that starts without importing torch until a command needs a model."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pretrainer

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_everywhere(capsys):
    from pretrainer.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"pretrainer {pretrainer.__version__}"
    assert importlib.metadata.version("pretrainer") == pretrainer.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "pretrainer._version.__version__" in pyproject


def test_the_licence_pyproject_names_is_in_the_repository():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'license = \{ text = "Apache-2.0" \}', pyproject)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (ROOT / "src" / "pretrainer" / "py.typed").is_file()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["finetune", "--help"], ["scaling", "--help"],
                                  ["prepare", "--help"], ["icl", "--help"], ["--version"], ["config", "--keys"]])
def test_the_command_line_starts_without_torch(argv):
    code = ("import sys\nfrom pretrainer.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write('TORCH=%%s' %% ('torch' in sys.modules))" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().endswith("TORCH=False"), done.stderr[-500:]


def test_the_library_still_offers_models_at_the_top_level():
    assert callable(pretrainer.build_model) and callable(pretrainer.load)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pretrainer.nope  # noqa: B018


@pytest.mark.parametrize("command", ["prepare", "tokenizer"])
def test_corpus_help_names_every_builtin_corpus(command, capsys):
    from pretrainer.cli import main
    from pretrainer.data.corpus import BUILTINS

    argv = [command, "train", "--help"] if command == "tokenizer" else [command, "--help"]
    with pytest.raises(SystemExit):
        main(argv)
    text = " ".join(capsys.readouterr().out.split())
    for name in BUILTINS:
        assert f"builtin:{name}" in text
