"""The names scripts use: :func:`build_model` and :func:`load`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .config import config_from_file
from .errors import CheckpointError, PretrainerError
from .model import build_model, make_model
from .train.checkpoint import latest_checkpoint, load_weights, verify_checkpoint
from .train.objectives import trained_module

__all__ = ["build_model", "load", "load_with_tokenizer", "generate_samples", "find_run_files"]


def find_run_files(path: str | Path, warn=None) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint folder)`` for a run folder (newest intact checkpoint; a broken
    newer one is reported through ``warn``, by default on stderr) or for one checkpoint folder
    inside a run (which must verify)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if (p / "config.yaml").is_file():
        ckpt, _ = latest_checkpoint(p, warn=warn)
        return p / "config.yaml", ckpt
    if (p / "state.json").is_file() and (p.parent.parent / "config.yaml").is_file():
        verify_checkpoint(p)
        return p.parent.parent / "config.yaml", p
    raise CheckpointError(f"{p}: not a run folder (no config.yaml), a checkpoint folder, "
                          f"or a Hugging Face folder (no config.json)")


def load(path: str | Path, device: str | torch.device = "cpu", warn=None,
         fast_paths: bool | None = None, trained: bool = False) -> torch.nn.Module:
    """A model with its trained weights, from a run folder (newest intact checkpoint, sharded or
    not), one checkpoint folder, or a Hugging Face model folder (``config.json`` + safetensors).
    Checkpoints are verified (sizes, SHA-256, headers); a broken newest one is skipped for the
    newest intact one with a warning through ``warn`` (default: one line on stderr).
    ``fast_paths`` (default: on a CPU) swaps in :mod:`pretrainer.model.fast`'s layers.

    A fine-tuning run gives its fine-tuned backbone (a text-to-text run's whole encoder-decoder, so
    ``generate`` answers with it); its task head is :class:`pretrainer.finetune.predict.Predictor`'s.
    The model is what the run produces: of an ELECTRA run, the discriminator. ``trained=True``
    returns what the run trained instead (ELECTRA: discriminator and generator, for evaluating
    with the run's objective)."""
    from .model.fast import apply_fast_paths

    from .finetune.backbone import is_finetune_run

    p = Path(path)
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from .interop.hf import import_hf

        model = import_hf(p)
    elif is_finetune_run(p):  # its fine-tuned backbone (a text2text run's whole model); heads: Predictor
        from .finetune.backbone import _from_finetune_run

        model = _from_finetune_run(p, from_scratch=False).model
    else:
        config_file, ckpt = find_run_files(p, warn)
        cfg = config_from_file(config_file)
        model = make_model(cfg.model)
        whole = trained_module(cfg, model)  # the checkpoint holds what the run trained
        load_weights(whole, ckpt)
        model = whole if trained else model
    if fast_paths if fast_paths is not None else torch.device(device).type == "cpu":
        apply_fast_paths(model)
    return model.to(device).eval()


def load_with_tokenizer(run: str | Path, device: str | torch.device = "cpu", overrides: dict | None = None,
                        warn=None):
    """``(model, tokenizer)`` of a run folder (its ``tokenizer/``), a checkpoint folder or a Hugging
    Face folder (its ``tokenizer.json``); ``overrides``: ``{role: token text}`` (see
    :func:`pretrainer.tokenization.load_tokenizer`)."""
    from .tokenization import load_tokenizer

    model = load(run, device=device, warn=warn)
    p = Path(run)
    tok_dir = p / "tokenizer"
    if not tok_dir.is_dir() and (p / "state.json").is_file():  # a checkpoint folder: its run's
        tok_dir = p.parent.parent / "tokenizer"
    if not tok_dir.is_dir() and (p / "tokenizer.json").is_file():
        tok_dir = p
    return model, load_tokenizer(tok_dir, overrides)


def generate_samples(model, tok, prompts: list[str], max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, seed: int, beams: int = 1,
                     no_repeat_ngram: int = 0, chat: bool = False) -> list[str]:
    """Complete each prompt (decoder-only) or answer it (encoder-decoder).

    A decoder-only prompt starts a new document as the model saw documents in training: after the
    end-of-text separator (``<eos>``, GPT-2's ``<|endoftext|>``), or after the beginning-of-text
    token of a tokenizer that starts every text with one (Llama's ``<s>``; see
    :func:`pretrainer.eval.scoring.prefix_ids`), and the text returned is the prompt plus its continuation. An
    encoder-decoder reads the prompt (ended by end-of-text, as in training) and the text returned
    is the decoder's output alone. Generation stops at end-of-text; ``beams`` > 1
    (encoder-decoders) searches instead of sampling; ``no_repeat_ngram`` = n > 0 never repeats an
    n-gram. ``chat`` (decoders): each prompt is a user's message, laid out by the tokenizer's chat
    template (:mod:`pretrainer.chat`) with the generation prompt, and the answer alone is returned."""
    import torch

    from .eval.scoring import prefix_ids

    if beams < 1:
        raise PretrainerError(f"--beams {beams}: expected a positive width (1 = no beam search)")
    if no_repeat_ngram < 0:
        raise PretrainerError(f"--no-repeat-ngram {no_repeat_ngram}: expected 0 (off) or a positive n-gram length")
    gen = torch.Generator().manual_seed(seed)
    eos = tok.need("eos", "to start and stop generation")
    pad = tok.pad_id
    seq2seq = getattr(model.cfg, "arch", "") == "encoder-decoder"
    if chat and getattr(model.cfg, "arch", "") != "decoder":
        raise PretrainerError("--chat applies to decoder runs (GPT, Llama), whose tokenizer's chat template "
                              "lays out the conversation")
    if beams > 1 and not seq2seq:
        raise PretrainerError("--beams applies to encoder-decoder runs (T5, BART); sample or use "
                              "--temperature 0 for greedy decoding")
    out = []
    context = getattr(model.cfg, "max_seq_len", None)
    for n, prompt in enumerate(prompts, 1):
        enc = tok.encode(prompt)
        length = len(enc) + 1
        if context and length > context:  # nothing is cropped without a word
            print(f"warning: prompt {n} is {length} tokens, more than the model's context of {context}; "
                  f"{'its first' if seq2seq else 'only its last'} {context} tokens are read",
                  file=sys.stderr, flush=True)
        if seq2seq:
            x = torch.tensor([enc[:context - 1 if context else None] + [eos]])
            y = model.generate(x, max_new_tokens, num_beams=beams, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_id=eos, generator=gen,
                               no_repeat_ngram_size=no_repeat_ngram)
            new = [i for i in y[0].tolist() if i not in (eos, pad)]
            out.append(tok.decode(new))
            continue
        if chat:  # the template's layout: "<eos>User: prompt\n\nAssistant:" by default
            from .chat import encode_chat

            ids = encode_chat(tok, [{"role": "user", "content": prompt}])
        else:
            ids = prefix_ids(tok) + enc  # a new document, as in training: "<eos> prompt", Llama's "<s> prompt"
        x = torch.tensor([ids])
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_id=eos, generator=gen, no_repeat_ngram_size=no_repeat_ngram)
        new = [i for i in y[0, len(ids):].tolist() if i != eos]
        out.append(tok.decode(new).strip() if chat else prompt + tok.decode(new))
    return out
