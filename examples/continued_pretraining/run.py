"""Continue pretraining a Hugging Face model with pretrainer, then hand it back to `transformers`:

    python examples/continued_pretraining/run.py [--work runs/examples/continued_pretraining] [--steps 60]

Nothing is downloaded. A stand-in for "a model from the Hub" is built first: a GPT-2 layout with
random weights and a byte-level BPE tokenizer trained on a few standard-library files, written
with ``save_pretrained`` as the Hub's folders are. With a real model, skip step 1 and pass its
folder (``--hf-model DIR``: a causal LM of a family ``pretrainer import`` reads, such as GPT-2,
GPT-Neo, GPT-NeoX, Llama, Mistral, Mixtral).

1. ``WORK/hf-model``: ``GPT2LMHeadModel`` + ``GPT2TokenizerFast`` saved by ``transformers``.
2. ``pretrainer import`` makes a run folder of it (weights, config, tokenizer).
3. ``pretrainer prepare`` tokenises ``builtin:stdlib`` (the first 300 files) with the model's own
   tokenizer (its end-of-text token ``<|endoftext|>`` is read by role).
4. ``pretrainer evaluate`` the imported model on that data, ``pretrainer pretrain
   init_from=WORK/imported`` for ``--steps`` steps (fresh optimizer, step 0), evaluate again.
5. ``pretrainer export`` writes a Hugging Face folder; ``transformers`` loads it and its logits
   are compared with pretrainer's, then it generates a line of code.

Every step but the first and last is a ``pretrainer`` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path


def sh(*args: str, capture: bool = False) -> str:
    cmd = ["pretrainer", *args]
    print("$", shlex.join(cmd), flush=True)
    r = subprocess.run([sys.executable, "-m", "pretrainer", *args], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if r.returncode:
        sys.exit(f"error: '{shlex.join(cmd)}' failed (exit status {r.returncode})")
    return r.stdout or ""


def make_hf_model(folder: Path) -> None:
    """A small GPT-2 and its tokenizer, saved as a Hub folder would be (random weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=128)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=eot, eos_token_id=eot)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}: GPT2LMHeadModel ({sum(p.numel() for p in GPT2LMHeadModel(config).parameters()):,} "
          f"parameters, random weights) and a {len(tokenizer):,}-token byte-level BPE tokenizer", flush=True)


def back_in_transformers(run: Path, exported: Path) -> dict:
    """Load the exported folder with transformers; compare its logits with pretrainer's on a text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pretrainer

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = pretrainer.load(str(run)).eval()
    text = "def read_config(path):\n    with open(path) as f:\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
        out = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    completion = tokenizer.decode(out[0, ids.shape[1]:])
    print(f"transformers loaded {exported}: {type(hf).__name__}; max |logit difference| with pretrainer "
          f"on {ids.shape[1]} tokens: {diff:.2e}")
    print("greedy continuation by transformers:", repr(completion))
    return {"max_abs_logit_diff": diff, "prompt_ids": ids[0].tolist(), "completion": completion}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/examples/continued_pretraining")
    p.add_argument("--hf-model", help="a Hugging Face model folder to start from (default: build a tiny GPT-2)")
    p.add_argument("--steps", type=int, default=60, help="continued-pretraining steps (default 60)")
    p.add_argument("--files", type=int, default=300, help="standard-library files to train on (default 300)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    hf_model = Path(args.hf_model) if args.hf_model else work / "hf-model"
    if not args.hf_model and not (hf_model / "config.json").is_file():
        make_hf_model(hf_model)
    imported, data, run, exported = work / "imported", work / "data", work / "continued", work / "exported"
    if not imported.exists():
        sh("import", str(hf_model), "--out", str(imported))
    if not (data / "manifest.json").is_file():
        sh("prepare", "--corpus", f"builtin:stdlib:{args.files}", "--tokenizer", str(hf_model), "--out", str(data))
    before = json.loads(sh("evaluate", str(imported), "--data", str(data), "--max-batches", "8", "--batch-size", "8",
                           "--json", capture=True))
    print(f"imported model: validation loss {before['val_loss']:.3f}", flush=True)
    if not (run / "config.yaml").is_file():
        sh("pretrain", f"init_from={imported}", f"data={data}", f"out={run}", f"train.max_steps={args.steps}",
           "train.batch_size=8", "train.seq_len=128", "train.lr=3e-3", "train.warmup_steps=5",
           f"train.eval_every={max(1, args.steps // 2)}", "train.eval_batches=8", "train.log_every=10")
    after = json.loads(sh("evaluate", str(run), "--max-batches", "8", "--batch-size", "8", "--json", capture=True))
    print(f"after {args.steps} steps of continued pretraining: validation loss {after['val_loss']:.3f} "
          f"(was {before['val_loss']:.3f})", flush=True)
    sh("export", str(run), "--out", str(exported))
    back = back_in_transformers(run, exported)
    summary = {"hf_model": str(hf_model), "run": str(run), "exported": str(exported), "steps": args.steps,
               "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"], **back}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {work / 'summary.json'}")
    return 0 if back["max_abs_logit_diff"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
