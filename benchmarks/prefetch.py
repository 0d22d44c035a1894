"""Step time with the training batches built ahead on a background thread (``train.prefetch=2``)
against built on the training thread between steps (``train.prefetch=0``), for the objectives whose
batches cost the most to build: ``t5-tiny`` span corruption and ``bert-mini`` masked LM (and the
causal LM, whose batches are slices, as a control).

Each configuration is a short pretraining run of the real trainer on ``builtin:stdlib`` (prepared
once); the two settings take turns for ``--rounds`` rounds, the order alternating, so the machine's
slow spells fall on both. Reported per objective: the median of each run's median ``ms_per_step``
(from ``metrics.jsonl``, first logged window dropped), the ratio off/on of each round and their
median, min and max.

    python benchmarks/prefetch.py [--quick] [--threads 2] [--json benchmarks/results/prefetch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from pretrainer.config import RunConfig, TrainConfig, model_preset  # noqa: E402
from pretrainer.data.prepare import prepare  # noqa: E402
from pretrainer.train.trainer import train  # noqa: E402

CASES = {  # name: (preset, objective, tokenizer spec, sentinels)
    "t5-tiny span": ("t5-tiny", "span", "unigram:4096", 100),
    "bert-mini mlm": ("bert-mini", "mlm", "wordpiece:4096", 0),
    "gpt-micro clm": ("gpt-micro", "clm", "bpe:4096", 0),
}


def run_once(data: Path, out: Path, preset: str, objective: str, prefetch: int, steps: int, batch: int) -> float:
    model = model_preset(preset)
    model.vocab_size = None
    cfg = RunConfig(model=model, data=str(data), out=str(out), objective=objective,
                    train=TrainConfig(max_steps=steps, batch_size=batch, seq_len=128, warmup_steps=5, eval_every=0,
                                      eval_batches=1, checkpoint_every=0, log_every=5, plot=False, device="cpu",
                                      prefetch=prefetch))
    train(cfg, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_step"] for r in rows if "ms_per_step" in r][1:]
    return statistics.median(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/prefetch.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.batch = 1, 12, 4
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prefetch-bench-"))
    results = {}
    for name, (preset, objective, tok, sentinels) in CASES.items():
        data = work / name.replace(" ", "-")
        prepare("builtin:stdlib:400" if args.quick else "builtin:stdlib", tok, data, sentinels=sentinels,
                progress=False)
        times = {0: [], 2: []}
        for r in range(args.rounds):
            for prefetch in ((0, 2) if r % 2 == 0 else (2, 0)):
                out = work / f"{data.name}-{prefetch}-{r}"
                times[prefetch].append(run_once(data, out, preset, objective, prefetch, args.steps, args.batch))
                print(f"{name}: round {r + 1}, prefetch={prefetch}: {times[prefetch][-1]:.1f} ms/step", flush=True)
        ratios = [off / on for off, on in zip(times[0], times[2])]
        results[name] = {"ms_per_step_off": times[0], "ms_per_step_on": times[2],
                         "median_off": statistics.median(times[0]), "median_on": statistics.median(times[2]),
                         "speedup_off_over_on": {"median": statistics.median(ratios), "min": min(ratios),
                                                 "max": max(ratios), "per_round": ratios}}
        print(f"{name}: off {results[name]['median_off']:.1f} ms, on {results[name]['median_on']:.1f} ms, "
              f"off/on {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)
    out = {"benchmark": "prefetch", "quick": args.quick, "rounds": args.rounds, "steps": args.steps,
           "batch_size": args.batch, "seq_len": 128, "threads": args.threads, "results": results,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "load_average_at_end": os.getloadavg()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
