"""Knowledge distillation: a smaller student trained from a larger teacher (``pretrainer distill``).

DistilBERT (Sanh et al. 2019) trains a BERT with half the layers on three losses: the soft-target
cross-entropy against the teacher's output distribution at a temperature (Hinton et al. 2015), the
student's own masked-LM loss, and a cosine loss that aligns the directions of the two models' hidden
states; the student starts from one teacher layer in two. The same recipe makes a smaller GPT from
a larger one (soft targets on the next-token distributions).

Distillation is an objective, ``distill`` (:class:`pretrainer.train.objectives.Distill`), so it runs
through the one training loop: checkpoints, exact resume, divergence guards, locks, metrics and
``torchrun`` are the trainer's. This module holds what the objective and the command need: the
teacher (:func:`teacher_model_config`, :func:`load_teacher`, :func:`check_teacher`), which teacher
layers a student starts from (:func:`student_layers`, :func:`init_student`) and the run config of
``pretrainer distill`` (:func:`distill_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import ModelConfig, RunConfig, apply_override, config_from_file, load_config, model_preset
from ..errors import ConfigError


def _teacher_files(teacher: str) -> tuple[Path | None, Path | None, Path | None]:
    """``(config.yaml or None, config.json or None, tokenizer folder or None)`` of a run, checkpoint
    or Hugging Face folder."""
    p = Path(teacher)
    if not p.exists():
        raise ConfigError(f"distill.teacher={teacher}: no such run, checkpoint or Hugging Face folder")
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return None, p / "config.json", p if (p / "tokenizer.json").is_file() else None
    from ..api import find_run_files

    config_file, _ = find_run_files(p, warn=lambda s: None)
    tok = config_file.parent / "tokenizer"
    return config_file, None, tok if (tok / "tokenizer.json").is_file() else None


def teacher_model_config(teacher: str) -> ModelConfig:
    """The model config of the teacher (read from its files; no weights loaded)."""
    config_yaml, config_json, _ = _teacher_files(teacher)
    if config_json is not None:
        from ..interop.hf import _read_json, config_from_hf

        return config_from_hf(_read_json(config_json), str(config_json))
    return config_from_file(config_yaml).model


def check_teacher(cfg: RunConfig, tokenizer_hash: str | None) -> ModelConfig:
    """The teacher's model config, after checking that it can teach ``cfg.model`` on data whose
    tokenizer has ``tokenizer_hash``: the same architecture, the same vocabulary size and the same
    tokenizer (a one-line ConfigError otherwise: soft targets over another vocabulary mean nothing)."""
    teacher = cfg.distill.teacher
    t = teacher_model_config(teacher)
    if t.arch != cfg.model.arch:
        raise ConfigError(f"distill.teacher={teacher} is arch={t.arch}, the student arch={cfg.model.arch}; "
                          f"a teacher teaches a student of its own architecture")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != t.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the teacher {teacher} has {t.vocab_size}; "
                          f"teacher and student must share the vocabulary (set model.vocab_size={t.vocab_size})")
    _, _, tok_dir = _teacher_files(teacher)
    if tok_dir is None:
        raise ConfigError(f"distill.teacher={teacher} has no tokenizer (tokenizer/tokenizer.json) to check "
                          f"that it shares the data's; teacher and student must share the tokenizer")
    if tokenizer_hash:
        from ..tokenization import load_tokenizer

        have = load_tokenizer(tok_dir)
        if not have.has_hash(tokenizer_hash):
            raise ConfigError(f"data={cfg.data} was tokenized with another tokenizer (hash {tokenizer_hash}) "
                              f"than the teacher {teacher} (hash {have.hash}); teacher and student must share "
                              f"the tokenizer: prepare the data with --tokenizer {tok_dir}")
    return t


def load_teacher(teacher: str, device: torch.device) -> torch.nn.Module:
    """The teacher, frozen and in eval mode on ``device``. Building it draws random weights before
    loading the trained ones: that happens with the random state put back afterwards, so a resumed
    run (which loads its teacher after restoring the random streams) draws what a run that never
    stopped draws."""
    from ..api import load

    with torch.random.fork_rng(devices=[]):
        model = load(teacher, device=device, warn=lambda s: None)
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The student's start


def student_layers(n_teacher: int, n_student: int) -> list[int]:
    """The teacher layers a student of ``n_student`` layers starts from: one in
    ``n_teacher / n_student``, spread evenly from the first to the last (12 -> 6: 0, 2, 4, 7, 9,
    11, the layers the released DistilBERT took from BERT-base; 4 -> 2: 0, 3). Empty when the
    student is deeper than its teacher."""
    if n_student > n_teacher:
        return []
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_student(model: torch.nn.Module, teacher: torch.nn.Module, sharded: bool = False) -> str:
    """Copy into the student every teacher tensor whose shape fits: block ``i`` from teacher block
    :func:`student_layers` ``[i]``, the embeddings, norms and output head from the teacher's own.
    Tensors whose shapes differ keep their random start, but for a position table of another
    length, whose common rows are taken. A student without segment embeddings (DistilBERT) of a
    teacher with them (BERT) gets the teacher's segment-0 row added to its positions: both are
    added to the token embedding, so its embeddings equal the teacher's. Returns what was taken,
    for the run's first log line. ``sharded``: the student is FSDP2-sharded (gathered and
    scattered here)."""
    layers = student_layers(teacher.cfg.n_layer, model.cfg.n_layer)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             set_model_state_dict)

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    source = teacher.state_dict()
    new, kept, partial = {}, [], []
    for key, value in state.items():
        name = key
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            if int(i) >= len(layers):
                kept.append(key)
                continue
            name = f"blocks.{layers[int(i)]}.{rest}"
        other = source.get(name)
        if other is not None and other.shape == value.shape:
            new[key] = other.to(value)
        elif key == "pos_emb.weight" and other is not None and other.shape[1:] == value.shape[1:]:
            rows = min(len(value), len(other))  # another context: position i is position i
            new[key] = torch.cat([other[:rows].to(value), value[rows:].detach()])
            partial.append(f"positions: the first {rows} of {len(value)} rows")
        else:
            kept.append(key)
    folded = "pos_emb.weight" in new and "type_emb.weight" in source and "type_emb.weight" not in state
    if folded:  # a student without segments (DistilBERT) of a BERT: x = tok + pos + seg[0], exactly
        new["pos_emb.weight"] = new["pos_emb.weight"] + source["type_emb.weight"][0].to(new["pos_emb.weight"])
    if sharded:
        set_model_state_dict(model, new, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for key, value in new.items():
                state[key].copy_(value)
    taken = sorted({int(k.split(".")[1]) for k in new if k.startswith("blocks.")})
    whole = [i for i in taken if not any(k.startswith(f"blocks.{i}.") for k in kept)]
    if not new:
        return f"student from random weights (no teacher tensor fits: {_why(model.cfg, teacher.cfg)})"
    text = (f"student layers {', '.join(map(str, whole))} from teacher layers "
            f"{', '.join(str(layers[i]) for i in whole)}" if whole else "no student layer from the teacher")
    text += f"; {len(new)} of {len(state)} tensors taken"
    notes = partial + (["the teacher's segment-0 embedding added to the positions"] if folded else [])
    if notes:
        text += f" ({'; '.join(notes)})"
    if kept:
        text += f", {len(kept)} random ({', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''})"
    return text


def _why(student: ModelConfig, teacher: ModelConfig) -> str:
    for name in ("d_model", "d_ff", "n_head", "vocab_size"):
        if getattr(student, name) != getattr(teacher, name):
            return f"model.{name} {getattr(student, name)} vs the teacher's {getattr(teacher, name)}"
    return "the layouts differ"


# ----------------------------------------------------------------------------------------------
# The command's run config


def distill_config(teacher: str, student: str | None = None, config: str | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config of ``pretrainer distill TEACHER --student PRESET [key=value ...]``.

    Without ``config`` (a YAML file) the run starts from the teacher run's own data, masking and
    train settings (a Hugging Face teacher has none: pass ``data=``); the student is ``student`` (a
    preset), else the config file's ``model``, else the teacher's architecture with half its layers
    (DistilBERT's recipe); its vocabulary is the teacher's. ``overrides`` (``out=``, ``train.max_steps=``, ``model.n_layer=``,
    ``distill.temperature=`` ...) come last."""
    t = teacher_model_config(teacher)
    config_yaml, _, _ = _teacher_files(teacher)
    file_model = False
    if config is not None:
        from ..config import _find_config_file, read_yaml

        cfg = load_config(config)
        file_model = "model" in read_yaml(_find_config_file(config))
    elif config_yaml is not None:
        own = config_from_file(config_yaml)
        cfg = RunConfig(data=own.data, masking=own.masking if t.arch == "encoder" else "token",
                        train=own.train)
    else:
        cfg = RunConfig()
    if student is not None:
        cfg.model = model_preset(student)
    elif not file_model:
        cfg.model = dataclasses.replace(t, n_layer=max(1, t.n_layer // 2), preset=None)
    cfg.objective, cfg.out, cfg.init_from = "distill", None, None
    cfg.distill.teacher = str(teacher)
    for item in overrides:
        apply_override(cfg, item)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = t.vocab_size
    return cfg
