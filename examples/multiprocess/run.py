"""Training on several processes with torchrun, on a CPU (gloo): DDP, FSDP2, and a stopped run resumed.

    python examples/multiprocess/run.py [--work runs/examples/multiprocess] [--steps 40]

The same commands run on GPUs (NCCL is chosen when CUDA is there) and on several machines (see
the README); here two processes share the CPU, so each is given one thread.

1. ``pretrainer prepare``: the first 200 files of ``builtin:stdlib``, a 2,048-token BPE tokenizer.
2. One process, ``train.batch_size=8``: the reference.
3. ``torchrun --nproc_per_node=2 -m pretrainer pretrain ... train.parallel=ddp train.batch_size=4``:
   two replicas, the same global batch of 8 (each process takes its own half of it).
4. The same with ``train.parallel=fsdp`` (FSDP2: every block and the root sharded, the model
   built on the ``meta`` device, sharded checkpoints through ``torch.distributed.checkpoint``),
   stopped early by a wall-clock budget (``train.max_minutes``, as a cluster's time limit would
   stop it: checkpoint, then exit), then ``torchrun ... pretrain --resume`` finishes it.
5. The logged training losses of the three runs are compared step by step: the same global
   batch gives the same losses (to float32 rounding), and the resumed run goes on exactly where
   it stopped.

Every step is a command, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str], shown: list[str], env=None) -> None:
    print("$", shlex.join(shown), flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode:
        sys.exit(f"error: '{shlex.join(shown)}' failed (exit status {r.returncode})")


def pretrainer(*args: str) -> None:
    run([sys.executable, "-m", "pretrainer", *args], ["pretrainer", *args])


def torchrun(*args: str) -> None:
    launcher = ["--standalone", "--nproc_per_node=2", "-m", "pretrainer", *args]
    run([sys.executable, "-m", "torch.distributed.run", *launcher], ["torchrun", *launcher],
        env=dict(os.environ, OMP_NUM_THREADS="1"))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/examples/multiprocess")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stop-after", type=float, default=0.05,
                   help="minutes before the FSDP run is stopped (train.max_minutes; default 0.05)")
    args = p.parse_args()
    work = Path(args.work)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        pretrainer("prepare", "--corpus", "builtin:stdlib:200", "--tokenizer", "bpe:2048", "--out", str(data))
    common = ["model=gpt-nano", f"data={data}", f"train.max_steps={args.steps}", "train.seq_len=128",
              "train.log_every=1", f"train.eval_every={args.steps // 2}", "train.eval_batches=4",
              f"train.checkpoint_every={args.steps // 2}", "train.warmup_steps=4", "train.lr=3e-3"]
    runs = {name: work / name for name in ("one", "ddp", "fsdp")}
    for name, path in runs.items():
        if path.exists():
            sys.exit(f"error: {path} exists; remove {work}/one, ddp and fsdp (or pass another --work) to run again")

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    pretrainer("pretrain", *common, f"out={runs['one']}", "train.batch_size=8", "--quiet")
    torchrun("pretrain", *common, f"out={runs['ddp']}", "train.batch_size=4", "train.parallel=ddp", "--quiet")
    torchrun("pretrain", *common, f"out={runs['fsdp']}", "train.batch_size=4", "train.parallel=fsdp",
             f"train.max_minutes={args.stop_after}")
    stopped = max(losses(runs["fsdp"]))
    if stopped < args.steps:
        print(f"the FSDP run stopped at step {stopped} of {args.steps}; resuming it", flush=True)
        torchrun("pretrain", "--resume", str(runs["fsdp"]), "train.max_minutes=0")
    else:
        print(f"the FSDP run finished all {args.steps} steps within {args.stop_after} min: nothing to resume "
              "(a smaller --stop-after stops it earlier)", flush=True)

    one, ddp, fsdp = (losses(runs[n]) for n in ("one", "ddp", "fsdp"))
    steps = sorted(one)
    assert sorted(ddp) == sorted(fsdp) == steps, "every run logs every step"
    worst = {name: max(abs(other[s] - one[s]) / one[s] for s in steps) for name, other in (("ddp", ddp), ("fsdp", fsdp))}
    print(f"\n{'step':>5} {'1 process':>10} {'ddp x2':>10} {'fsdp x2':>10}")
    shown = sorted(set(steps[:: max(1, len(steps) // 8)]) | {steps[-1]} | ({stopped, stopped + 1} & set(steps)))
    for s in shown:
        print(f"{s:>5} {one[s]:>10.4f} {ddp[s]:>10.4f} {fsdp[s]:>10.4f}"
              + ("   <- the FSDP run resumed here" if s == stopped + 1 else ""))
    print(f"largest relative difference from one process over {len(steps)} steps: ddp {worst['ddp']:.1e}, "
          f"fsdp (stopped at step {stopped}, resumed) {worst['fsdp']:.1e}")
    summary = {"steps": args.steps, "fsdp_stopped_at": stopped, "max_rel_diff": worst,
               "runs": {k: str(v) for k, v in runs.items()}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {work / 'summary.json'}")
    return 0 if max(worst.values()) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
