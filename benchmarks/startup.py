"""Start-up time of the command line: ``pretrainer --help`` and friends beside ``import transformers``.

Each command runs in a fresh process, the commands taking turns (``--rounds`` rounds, the order
rotated every round), and the script reports the median wall time and the spread per command, and
whether the process imported torch (read from ``python -X importtime``'s list, in one extra run of
each command). The goal (issue 19): ``pretrainer --help`` imports no torch and answers in under
0.5 s on the 2-core development machine.

    python benchmarks/startup.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
COMMANDS = {
    "pretrainer --help": [PY, "-m", "pretrainer", "--help"],
    "pretrainer --version": [PY, "-m", "pretrainer", "--version"],
    "pretrainer pretrain --help": [PY, "-m", "pretrainer", "pretrain", "--help"],
    "pretrainer config --keys": [PY, "-m", "pretrainer", "config", "--keys"],
    "python -c 'import torch'": [PY, "-c", "import torch"],
    "python -c 'import transformers'": [PY, "-c", "import transformers"],
}


def wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def imports_torch(cmd: list[str], env: dict) -> bool:
    """Whether the process imports torch: ``-X importtime`` lists every module imported."""
    out = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, check=True)
    return any(line.rstrip().endswith("| torch") for line in out.stderr.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=str(HERE / "results" / "startup.json"))
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    names = list(COMMANDS)
    for name in names:  # warm the file cache once
        wall(COMMANDS[name], env)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(wall(COMMANDS[name], env))
    rows = {}
    for name in names:
        xs = sorted(times[name])
        rows[name] = {"median_s": statistics.median(xs), "q1_s": xs[len(xs) // 4], "q3_s": xs[(3 * len(xs)) // 4],
                      "min_s": xs[0], "max_s": xs[-1], "imports_torch": imports_torch(COMMANDS[name], env)}
        r = rows[name]
        print(f"{name:34s} median {r['median_s']:.3f} s (quartiles {r['q1_s']:.3f}-{r['q3_s']:.3f})  "
              f"torch imported: {'yes' if r['imports_torch'] else 'no'}")
    result = {"benchmark": "startup", "rounds": args.rounds, "commands": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"result: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
