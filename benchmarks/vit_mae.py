"""ViT from scratch against MAE-pretrained then fine-tuned, on scikit-learn's 8 x 8 digits (He et al.
2022, "Masked Autoencoders Are Scalable Vision Learners": MAE pretraining improves ViT fine-tuning).

For each seed, interleaved:

1. ``pretrainer pretrain model=vit-tiny objective=mae data=DIGITS`` (patches of 2 x 2: 16 per image,
   12 of them hidden; the decoder half as wide, 2 blocks; pixel targets normalised per patch) on the
   training images (their labels unused);
2. ``pretrainer finetune MAE_RUN --task image-classification --data DIGITS`` for E epochs;
3. ``pretrainer finetune vit-tiny --from-scratch --task image-classification --data DIGITS`` with
   the same epochs, batch, learning rate and seed: the same architecture and steps, random weights.

Validation accuracy (180 held-out images) after every fine-tuning epoch, for both, over 3 seeds:
medians with min / max. The MAE run's steps are extra compute the scratch model never gets, so the
comparison is "equal fine-tuning steps", as the issue asks, not equal total compute; a scratch run
as long as pretraining + fine-tuning can be added (``--long-scratch``).

    python benchmarks/vit_mae.py [--seeds 3] [--mae-steps 400] [--epochs 6] [--long-scratch] [--quick]

Writes ``benchmarks/results/vit_mae.json``, ``vit_mae.png`` (accuracy bars and curves) and
``vit_mae_reconstructions.png`` (validation digits, their masked inputs, and the MAE's
reconstructions). One CPU thread (``torch.set_num_threads(1)``): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "val_accuracy": r["val_accuracy"]} for r in rows if "val_accuracy" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mae-steps", type=int, default=400)
    p.add_argument("--mae-batch", type=int, default=128)
    p.add_argument("--mae-lr", type=float, default=1.5e-3)
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (26 steps each at batch 64)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--long-scratch", action="store_true", help="also a scratch run of as many steps as pretraining + "
                   "fine-tuning together (equal optimizer steps; slower)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 30 MAE steps, 1 epoch")
    p.add_argument("--work", default=str(HERE / "runs" / "vit_mae"))
    p.add_argument("--json", default=str(HERE / "results" / "vit_mae.json"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.mae_steps, args.epochs = 1, 30, 1

    import torch

    torch.set_num_threads(1)
    from pretrainer.config import load_config
    from pretrainer.data.images import prepare_images
    from pretrainer.finetune.images import finetune_images
    from pretrainer.train.trainer import train

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "digits"
    manifest = prepare_images("builtin:digits", data, progress=False)
    n_train = manifest["splits"]["train"]["count"]
    ft_steps = args.epochs * -(-n_train // args.batch)
    ft = dict(epochs=args.epochs, batch_size=args.batch, lr=args.lr, weight_decay=0.05, warmup=0.1, quiet=True)
    results = {"mae": [], "scratch": [], "long_scratch": []}
    started = time.perf_counter()
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        mae_run = work / f"mae-{seed}"
        cfg = load_config(None, [
            "model=vit-tiny", "objective=mae", f"data={data}", f"out={mae_run}", f"train.seed={seed}",
            f"train.max_steps={args.mae_steps}", f"train.batch_size={args.mae_batch}", f"train.lr={args.mae_lr}",
            "train.weight_decay=0.05", f"train.warmup_steps={max(1, args.mae_steps // 10)}",
            f"train.eval_every={args.mae_steps}", "train.eval_batches=2", "train.log_every=100", "train.plot=false",
            f"train.checkpoint_every={args.mae_steps}", "train.keep_checkpoints=1"])
        mae = train(cfg, quiet=True)
        t_mae = time.perf_counter() - t0
        for kind, source, extra in (("mae", str(mae_run), {}), ("scratch", "vit-tiny", {"from_scratch": True}),
                                    ("long_scratch", "vit-tiny", {"from_scratch": True})):
            if kind == "long_scratch" and not args.long_scratch:
                continue
            t1 = time.perf_counter()
            opts = dict(ft, seed=seed, **extra)
            if kind == "long_scratch":  # as many optimizer steps as MAE pretraining + fine-tuning (whole epochs)
                opts["epochs"] = args.epochs + round(args.mae_steps / -(-n_train // args.batch))
            r = finetune_images(source, str(data), str(work / f"ft-{kind}-{seed}"), **opts)
            results[kind].append({"seed": seed, "accuracy": r["accuracy"], "steps": r["steps"],
                                  "curve": curve(work / f"ft-{kind}-{seed}"), "seconds": round(time.perf_counter() - t1, 1),
                                  **({"mae_val_loss": mae["val_loss"], "mae_seconds": round(t_mae, 1)} if kind == "mae" else {})})
            print(f"seed {seed} {kind:>12}: accuracy {r['accuracy']:.4f} after {r['steps']} fine-tuning steps "
                  f"({time.perf_counter() - t1:.0f} s{'; MAE %d steps, val loss %.4f, %.0f s' % (args.mae_steps, mae['val_loss'], t_mae) if kind == 'mae' else ''})",
                  flush=True)

    summary = {k: spread([r["accuracy"] for r in v]) for k, v in results.items() if v}
    gain = [m["accuracy"] - s["accuracy"] for m, s in zip(results["mae"], results["scratch"])]
    out = {
        "benchmark": "vit_mae", "data": "builtin:digits (1,617 train / 180 val images, 8 x 8 grey, 10 classes)",
        "model": "vit-tiny: 4 layers x 64 wide, 4 heads, FFN 256, patches 2 x 2 (16 + <cls>); 202,186 parameters with the classifier",
        "mae": {"steps": args.mae_steps, "batch": args.mae_batch, "lr": args.mae_lr, "mask_ratio": 0.75,
                "decoder": "32 wide, 2 blocks, 2 heads", "norm_pix_loss": True, "weight_decay": 0.05},
        "finetune": {"epochs": args.epochs, "steps": ft_steps, "batch": args.batch, "lr": args.lr, "weight_decay": 0.05,
                     "warmup": 0.1, "schedule": "linear decay to 0"},
        "seeds": args.seeds, "threads": 1, "quick": args.quick,
        "accuracy": summary, "mae_minus_scratch": spread(gain), "runs": results,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "note": "equal fine-tuning steps; MAE pretraining steps are extra compute (long_scratch: scratch run of the "
                "combined number of steps)",
    }
    path = Path(args.json)
    if args.quick:
        path = path.with_name(path.stem + "_quick.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"accuracy": {k: {"median": v["median"], "min": v["min"], "max": v["max"]} for k, v in summary.items()},
                      "mae_minus_scratch": {k: out["mae_minus_scratch"][k] for k in ("median", "min", "max")},
                      "seconds": out["seconds"]}, indent=2))
    plot(results, path.with_suffix(".png"), args)
    pictures(work / "mae-0", data, path.with_name(path.stem + "_reconstructions.png"))
    print(f"wrote {path}, {path.with_suffix('.png')}, {path.with_name(path.stem + '_reconstructions.png')}")
    return 0


def plot(results: dict, png: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"scratch": "from scratch", "mae": "MAE-pretrained", "long_scratch": "from scratch, as many steps as MAE + FT"}
    kinds = [k for k in ("scratch", "mae", "long_scratch") if results[k]]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for i, k in enumerate(kinds):
        accs = [r["accuracy"] for r in results[k]]
        med = statistics.median(accs)
        bars.bar(i, med, color=f"C{i}", yerr=[[med - min(accs)], [max(accs) - med]], capsize=6)
        bars.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
        bars.text(i, med / 2, f"{med:.3f}", ha="center", color="white", fontsize=10)
    bars.set_xticks(range(len(kinds)), [labels[k].replace(", ", ",\n") for k in kinds], fontsize=8)
    bars.set_ylabel("validation accuracy (180 digits)")
    long = f"; long: {results['long_scratch'][0]['steps']}" if results["long_scratch"] else ""
    bars.set_title(f"after {results['scratch'][0]['steps']} fine-tuning steps{long}", fontsize=9)
    bars.set_ylim(0, 1)
    for i, k in enumerate(kinds[:2]):
        for j, r in enumerate(results[k]):
            xs = [c["step"] for c in r["curve"]]
            curves.plot(xs, [c["val_accuracy"] for c in r["curve"]], "o-", color=f"C{i}", ms=3, alpha=0.8,
                        label=labels[k] if j == 0 else None)
    curves.set_xlabel("fine-tuning step")
    curves.set_ylabel("validation accuracy")
    curves.set_title(f"vit-tiny on 8x8 digits, {len(results['scratch'])} seeds, 1 CPU thread", fontsize=9)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def pictures(mae_run: Path, data: Path, png: Path, n: int = 8) -> None:
    """Validation digits, the masked input (hidden patches grey), the MAE's reconstruction (its
    per-patch normalised prediction mapped back with the true patch's mean and std, as He et al.'s
    figures do) and the reconstruction with the visible patches pasted in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import pretrainer
    from pretrainer.data.images import ImageSplit, sample_noise
    from pretrainer.model.vit import patchify, unpatchify

    whole = pretrainer.load(mae_run, trained=True)  # encoder + decoder
    cfg = whole.encoder.cfg
    x, _ = ImageSplit(data, "val").read(range(n))
    noise = torch.stack([sample_noise(0, i, cfg.n_patches) for i in range(n)])
    with torch.no_grad():
        pred, mask = whole.reconstruct(x, noise)
    P, C, S = cfg.patch_size, cfg.channels, cfg.image_size
    target = patchify(x, P)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    rec = pred * std + mean if whole.norm_pix_loss else pred
    m = mask.unsqueeze(-1)
    rows = {"original": x, "masked input": unpatchify(target * (1 - m) + 0.0 * m, P, C, S, S),
            "reconstruction": unpatchify(rec, P, C, S, S),
            "reconstruction + visible": unpatchify(rec * m + target * (1 - m), P, C, S, S)}
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.25), dpi=110)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            img = imgs[c, 0].clamp(-1, 1).numpy()
            ax.imshow(img, cmap="gray_r", vmin=-1, vmax=1)
            if name == "masked input":  # hidden patches shown hatched in grey
                hidden = mask[c].reshape(S // P, S // P).repeat_interleave(P, 0).repeat_interleave(P, 1).numpy()
                ax.imshow(hidden, cmap="Reds", alpha=0.35 * hidden, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("MAE on 8x8 digits: 75 % of the 2x2 patches hidden (red), validation images", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
