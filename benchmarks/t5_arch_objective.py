"""A CPU-sized version of the T5 paper's architecture x objective table (Raffel et al. 2020,
section 3.2, Table 2), by configuration alone.

Architectures (the paper's names): an encoder-decoder (L encoder + L decoder layers: 2P parameters,
about M FLOPs per token pair), a decoder-only "language model" (L layers, causal over
input + target: P parameters, M FLOPs) and a "prefix LM" (the same decoder whose input part attends
both ways: ``prefix_mask=true``). Objectives: denoising (``span``: T5 span corruption, 15 % noise in
spans of mean 3) and LM (``prefix_lm``: a window split at a random point, predict the rest). Every
cell is one ``pretrainer pretrain`` run with the same data, steps, batch and learning rate:

    encoder-decoder  model=t5-tiny ...                                       objective=span | prefix_lm
    language model   model=t5-tiny model.arch=decoder prefix_mask=false ...  objective=span | prefix_lm
    prefix LM        model=t5-tiny model.arch=decoder prefix_mask=true ...   objective=span | prefix_lm

(T5's blocks in all three, with the plain N(0, 0.02) initialisation and scaled attention so one
AdamW setting suits all; a decoder's relative position bias has one-directional buckets, so the
prefix tokens it lets see ahead are all at distance 0 for it.)

The paper compares the cells by fine-tuning on GLUE, CNN/DM, SQuAD, SuperGLUE and WMT; at CPU
scale we compare by held-out loss on both objectives' validation sets (each model evaluated on
both; the LM objective's loss, predicting a continuation from a prefix, is a yardstick every cell
can be read on). This is a different measurement from the paper's and is reported as it comes out.

    python benchmarks/t5_arch_objective.py [--steps 600] [--docs 400] [--json benchmarks/results/t5_arch_objective.json]

Writes the JSON and a PNG beside it (grouped bars).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAME = ["model=t5-tiny", "model.init_scheme=normal", "model.attn_scale=true", "model.scale_tied_output=false"]
ARCHS = {  # T5's blocks everywhere (relative position bias, RMSNorm, ReLU), one optimizer setting
    "encoder-decoder": SAME,
    "language model": SAME + ["model.arch=decoder", "prefix_mask=false"],
    "prefix LM": SAME + ["model.arch=decoder", "prefix_mask=true"],
}
OBJECTIVES = {"denoising (span)": "span", "LM (prefix_lm)": "prefix_lm"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--docs", type=int, default=400, help="standard-library files in the corpus (default 400)")
    p.add_argument("--layers", type=int, default=2, help="L: layers per stack (default 2)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--work", default=str(HERE / "runs" / "t5_arch_objective"))
    p.add_argument("--json", default=str(HERE / "results" / "t5_arch_objective.json"))
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the --json results, train nothing")
    args = p.parse_args()
    if args.replot:
        plot(json.loads(Path(args.json).read_text())["cells"], Path(args.json).with_suffix(".png"))
        return 0

    import torch

    from pretrainer.config import load_config
    from pretrainer.data.prepare import prepare
    from pretrainer.data.tokens import TokenSplit
    from pretrainer import load
    from pretrainer.train.objectives import get_objective
    from pretrainer.train.trainer import evaluate_split, train

    torch.set_num_threads(2)
    work = Path(args.work)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare(f"builtin:stdlib:{args.docs}", "unigram:4096", data, sentinels=100, overwrite=True)
    val = TokenSplit(data, "val")
    size = [f"model.n_layer={args.layers}", f"model.d_model={args.width}", "model.n_head=4",
            f"model.d_ff={4 * args.width}", "model.max_seq_len=512", "model.vocab_size=null"]
    common = [f"data={data}", f"train.max_steps={args.steps}", "train.batch_size=16", "train.seq_len=128",
              f"train.lr={args.lr}", "train.warmup_steps=50", "train.eval_every=0", "train.eval_batches=8",
              f"train.log_every={max(1, args.steps // 10)}", "train.checkpoint_every=0", "train.plot=false",
              "train.seed=0"]
    cells = {}
    for arch, arch_keys in ARCHS.items():
        for label, name in OBJECTIVES.items():
            out = work / f"{arch.replace(' ', '_')}-{name}"
            overrides = arch_keys + size + common + [f"objective={name}", f"out={out}"]
            cfg = load_config(None, overrides)
            t0 = time.time()
            if not (out / "checkpoints").is_dir():
                print(f"--- {arch} x {label}", file=sys.stderr, flush=True)
                train(cfg, quiet=True)
            model = load(out)
            scores = {}
            for other in OBJECTIVES.values():  # the same model on both validation sets
                c = load_config(None, overrides[:-2] + [f"objective={other}", f"out={out}"])
                c.model = model.cfg
                scores[other] = evaluate_split(model, get_objective(c), val, 16, 8)["val_loss"]
            cells[f"{arch} | {label}"] = {"arch": arch, "objective": name, "overrides": overrides,
                                           "params": sum(p.numel() for p in model.parameters()),
                                           "val_loss": scores, "seconds": round(time.time() - t0, 1)}
            print(f"{arch:16s} {label:18s} val loss span {scores['span']:.3f}  prefix_lm "
                  f"{scores['prefix_lm']:.3f}  ({cells[f'{arch} | {label}']['params']:,} params)", flush=True)

    result = {"benchmark": "t5_arch_objective", "steps": args.steps, "docs": args.docs,
              "layers": args.layers, "width": args.width, "lr": args.lr, "cells": cells,
              "paper": "Raffel et al. 2020, Table 2: encoder-decoder + denoising best downstream; "
                       "denoising beats LM for every architecture; prefix LM beats the causal LM",
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    plot(cells, Path(args.json).with_suffix(".png"))
    print(f"-> {args.json}")
    return 0


def plot(cells: dict, path: Path) -> None:
    from pretrainer.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=False)
    for ax, yard in zip(axes, ("prefix_lm", "span")):
        for j, (label, name) in enumerate(OBJECTIVES.items()):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(ARCHS))]
            ys = [cells[f"{arch} | {label}"]["val_loss"][yard] for arch in ARCHS]
            ax.bar(xs, ys, width=0.36, label=f"pretrained: {label}")
        ax.set_xticks(range(len(ARCHS)), list(ARCHS))
        ax.set_title(f"validation loss on the {yard} objective")
        ax.set_ylabel("nats / predicted token")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, None)  # bars from zero: their heights compare
    axes[0].legend(fontsize=8)
    fig.suptitle("architecture x objective (T5 Table 2, CPU scale)")
    save(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
