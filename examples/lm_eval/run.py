"""A pretrainer run scored by lm-evaluation-harness on a local task, three ways that agree:

    python examples/lm_eval/run.py [--work runs/examples/lm_eval] [--steps 400]    # from the repository root

Needs lm-eval (``pip install 'pretrainer[eval]'``). Nothing is downloaded: the task
(``examples/lm_eval/tasks/successor_local.yaml``) reads its rows from ``tasks/successor.jsonl``.

1. ``pretrainer prepare`` + ``pretrain``: a small GPT (``gpt-nano`` with rotary positions, 2
   layers, 64 wide; character tokenizer) on ``builtin:icl-synthetic``, documents of solved examples
   of four synthetic tasks, such as ``mx => my`` (successor) or ``f=6 a=4 n=8 ? n => 8`` (lookup).
2. ``pretrainer lm-eval --model pretrainer --model_args run=RUN ...``: lm_eval's own command line
   (every lm_eval argument) with the model name ``pretrainer`` registered.
3. ``pretrainer icl RUN --task tasks/successor.jsonl --scoring choice --shots 0``: the same rows and
   the same prompts through pretrainer's own evaluator; its ``accuracy_sum`` is lm-eval's ``acc``.
4. ``pretrainer export`` and ``lm_eval --model hf --model_args pretrained=EXPORTED``: lm-eval with
   its own Hugging Face model class and no pretrainer code at all. The exported tokenizer lays a
   prompt out as training did (the end-of-text token first, which is also its ``bos_token``, so
   ``add_bos_token=True`` changes nothing).

Every step is a command, printed before it runs; the accuracies are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = HERE / "tasks"
TASK = "successor_local"


def run(cmd: list[str], shown: list[str], capture: bool = False) -> str:
    print("$", shlex.join(shown), flush=True)
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if r.returncode:
        sys.exit(f"error: '{shlex.join(shown)}' failed (exit status {r.returncode})")
    return r.stdout or ""


def pretrainer(*args: str, capture: bool = False) -> str:
    return run([sys.executable, "-m", "pretrainer", *args], ["pretrainer", *args], capture)


def lm_eval_acc(output_path: Path) -> dict:
    """acc and acc_norm of the task from the newest results file lm_eval wrote under ``output_path``."""
    newest = max(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    res = json.loads(newest.read_text())["results"][TASK]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/examples/lm_eval")
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    if not Path("examples/lm_eval/tasks/successor.jsonl").is_file():
        sys.exit("error: run this from the repository root (the task's data path is relative to it)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("error: lm-eval is not installed; pip install 'pretrainer[eval]' (or lm-eval)")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # a local task: nothing to fetch
    work = Path(args.work)
    data, run_dir, exported = work / "data", work / "run", work / "exported"

    if not (data / "manifest.json").is_file():
        pretrainer("prepare", "--corpus", "builtin:icl-synthetic:4000", "--tokenizer", "char", "--out", str(data))
    if not (run_dir / "config.yaml").is_file():
        pretrainer("pretrain", "model=gpt-nano", "model.position=rope", "model.n_layer=2", "model.d_model=64",
                   "model.n_head=4", f"data={data}", f"out={run_dir}", f"train.max_steps={args.steps}",
                   "train.batch_size=16", "train.seq_len=128", "train.lr=1e-2", "train.warmup_steps=20",
                   f"train.eval_every={args.steps}", "train.log_every=50")

    # 2. lm_eval's command line, through pretrainer (which registers the model name first)
    pretrainer("lm-eval", "--model", "pretrainer", "--model_args", f"run={run_dir}", "--tasks", TASK,
               "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "16",
               "--output_path", str(work / "lm-eval-pretrainer"))
    via_pretrainer = lm_eval_acc(work / "lm-eval-pretrainer")

    # 3. pretrainer's own in-context evaluator on the same rows
    icl = json.loads(pretrainer("icl", str(run_dir), "--task", str(TASKS / "successor.jsonl"), "--scoring", "choice",
                                "--shots", "0", "--out", str(work / "icl"), "--json", capture=True))
    zero = icl["runs"][0]["shots"]["0"]

    # 4. lm-eval's Hugging Face model class on the exported folder
    pretrainer("export", str(run_dir), "--out", str(exported))
    hf_args = ["--model", "hf", "--model_args", f"pretrained={exported}", "--tasks", TASK,
               "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "16",
               "--output_path", str(work / "lm-eval-hf")]
    run([sys.executable, "-m", "lm_eval", *hf_args], ["lm_eval", *hf_args])
    via_hf = lm_eval_acc(work / "lm-eval-hf")

    print(f"\n{TASK}, {zero['n']} rows, 0 shots (chance 0.25):")
    print(f"  pretrainer lm-eval --model pretrainer     acc {via_pretrainer['acc']:.3f}   acc_norm {via_pretrainer['acc_norm']:.3f}")
    print(f"  lm_eval --model hf (exported folder)      acc {via_hf['acc']:.3f}   acc_norm {via_hf['acc_norm']:.3f}")
    print(f"  pretrainer icl --scoring choice           accuracy_sum {zero['accuracy_sum']:.3f}   "
          f"accuracy (per token) {zero['accuracy']:.3f}")
    summary = {"task": TASK, "rows": zero["n"], "lm_eval_pretrainer": via_pretrainer, "lm_eval_hf": via_hf,
               "icl": {"accuracy_sum": zero["accuracy_sum"], "accuracy": zero["accuracy"]}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {work / 'summary.json'}")
    same = abs(via_pretrainer["acc"] - zero["accuracy_sum"]) < 1e-9 and abs(via_hf["acc"] - via_pretrainer["acc"]) < 1e-9
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
