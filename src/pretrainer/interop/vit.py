"""Hugging Face interop of the Vision Transformer (:mod:`pretrainer.model.vit`).

- Export: a ViT with a classifier (``model.n_classes`` > 0) is written as
  ``ViTForImageClassification`` (``vit.*`` + ``classifier``); one without as ``ViTModel`` (no
  prefix; with ``model.pooler`` its pooler, without one load it with
  ``ViTModel.from_pretrained(folder, add_pooling_layer=False)``). The encoder of an MAE run is such
  a ViTModel. ``id2label`` holds the class names when they are given (an image run's data).
- Import: ``model_type`` ``vit`` (``ViTModel``, ``ViTForImageClassification``: the classifier and
  pooler present decide ``n_classes`` and ``pooler``) and ``vit_mae`` (``ViTMAEModel``,
  ``ViTMAEForPreTraining``: its encoder; the pixel decoder's ``decoder.*`` tensors are not
  imported, and ViTMAE's fixed sin-cos positions become our learned ones).

Our fused [q; k; v] matrix is split into ViT's ``query``, ``key`` and ``value``; everything else is
one tensor for one tensor (the name table :func:`vit_tensors`). A config field or tensor without an
equivalent is refused with a one-line PretrainerError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import PretrainerError, writing_folder

VIT_TYPES = ("vit", "vit_mae")
_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def is_vit_config(raw: dict) -> bool:
    return raw.get("model_type") in VIT_TYPES


def check_convertible(cfg: ModelConfig) -> None:
    """Refuse a ViT configuration that Hugging Face's ViT cannot hold, naming the option."""
    wanted = dict(norm="layernorm", prenorm=True, bias=True, attn_scale=True, parallel_block=False,
                  share_layers="none", n_kv_heads=None, d_head=None)
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise PretrainerError(f"model.{name}={getattr(cfg, name)!r} has no Hugging Face ViT equivalent "
                                  f"(ViT has {name}={value!r})")
    if cfg.mlp not in _ACT:
        raise PretrainerError(f"model.mlp={cfg.mlp!r} has no Hugging Face ViT equivalent (expected one of {', '.join(_ACT)})")
    if cfg.moe.n_experts:
        raise PretrainerError(f"model.moe.n_experts={cfg.moe.n_experts} has no Hugging Face ViT equivalent")


def vit_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(our name, Hugging Face names)`` of every tensor; several HF names are stacked into ours
    (rows), in order. HF names are a full ``ViTForImageClassification``'s (``vit.`` prefix)."""
    out = [("patch_emb.proj.weight", ("vit.embeddings.patch_embeddings.projection.weight",)),
           ("patch_emb.proj.bias", ("vit.embeddings.patch_embeddings.projection.bias",)),
           ("cls_token", ("vit.embeddings.cls_token",)),
           ("pos_emb", ("vit.embeddings.position_embeddings",))]
    for i in range(cfg.n_layer):
        hf = f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out += [(f"blocks.{i}.norm1.{kind}", (f"{hf}layernorm_before.{kind}",)),
                    (f"blocks.{i}.attn.qkv.{kind}", tuple(f"{hf}attention.attention.{n}.{kind}"
                                                        for n in ("query", "key", "value"))),
                    (f"blocks.{i}.attn.proj.{kind}", (f"{hf}attention.output.dense.{kind}",)),
                    (f"blocks.{i}.norm2.{kind}", (f"{hf}layernorm_after.{kind}",)),
                    (f"blocks.{i}.mlp.up.{kind}", (f"{hf}intermediate.dense.{kind}",)),
                    (f"blocks.{i}.mlp.down.{kind}", (f"{hf}output.dense.{kind}",))]
    for kind in ("weight", "bias"):
        out.append((f"norm_f.{kind}", (f"vit.layernorm.{kind}",)))
        if cfg.pooler:
            out.append((f"pooler.{kind}", (f"vit.pooler.dense.{kind}",)))
        if cfg.n_classes:
            out.append((f"head.{kind}", (f"classifier.{kind}",)))
    return out


# ----------------------------------------------------------------------------------------------
# Export


def vit_hf_config(cfg: ModelConfig, classes: list[str] | None = None) -> dict:
    check_convertible(cfg)
    config = {
        "architectures": ["ViTForImageClassification" if cfg.n_classes else "ViTModel"], "model_type": "vit",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ff_dim, "hidden_act": _ACT[cfg.mlp], "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.channels, "qkv_bias": cfg.has_qkv_bias, "encoder_stride": cfg.patch_size,
        "pooler_output_size": cfg.d_model, "pooler_act": "tanh", "dtype": "float32",
    }
    if cfg.n_classes:
        names = classes if classes and len(classes) == cfg.n_classes else [f"LABEL_{i}" for i in range(cfg.n_classes)]
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    return config


def to_vit_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our ViT's tensors under Hugging Face names (``vit.`` dropped for a bare ViTModel)."""
    cfg, ours = model.cfg, model.state_dict()
    bare = not cfg.n_classes
    weights = {}
    for name, hf in vit_tensors(cfg):
        tensor = ours[name].detach()
        pieces = tensor.chunk(len(hf)) if len(hf) > 1 else [tensor]
        for key, piece in zip(hf, pieces):
            weights[key.removeprefix("vit.") if bare else key] = piece.clone(memory_format=torch.contiguous_format)
    return weights


def export_vit(model: torch.nn.Module, out_dir: str | Path, classes: list[str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face ViT folder (``config.json`` + ``model.safetensors``)."""
    from .hf import _write

    config = vit_hf_config(model.cfg, classes)
    weights = to_vit_state_dict(model)
    out = Path(out_dir)
    with writing_folder(out, "export"):
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
        _write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


# ----------------------------------------------------------------------------------------------
# Import


def vit_config_from_hf(raw: dict, where: str, names=()) -> ModelConfig:
    """Our ViT config for a ``vit`` or ``vit_mae`` ``config.json``; ``names``: the checkpoint's
    tensor names (full, ``vit.`` prefixed), which decide the pooler and the classifier."""
    from .hf import _Fields

    f = _Fields(raw, where)
    f.expect("qkv_bias", True, True)
    if raw.get("model_type") == "vit":
        f.expect("pooler_act", "tanh", "tanh")
        f.expect("pooler_output_size", f.get("hidden_size"), f.get("hidden_size"))
    side, patch = f.get("image_size", 224), f.get("patch_size", 16)
    for key, value in (("image_size", side), ("patch_size", patch)):
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise PretrainerError(f"{where}: {key}={value!r} has no pretrainer equivalent (square images and patches only)")
    side = side[0] if isinstance(side, (list, tuple)) else side
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    labels = raw.get("id2label") or {}
    n_classes = (len(labels) or raw.get("num_labels") or 0) if "classifier.weight" in names else 0
    dropout = f.get("hidden_dropout_prob", 0.0)
    if f.get("attention_probs_dropout_prob", 0.0) != dropout:
        raise PretrainerError(f"{where}: attention_probs_dropout_prob={raw.get('attention_probs_dropout_prob')!r} "
                              f"differs from hidden_dropout_prob={dropout!r}; pretrainer has one model.dropout")
    cfg = ModelConfig(arch="vit", position="learned", norm="layernorm", prenorm=True, bias=True,
                      tie_embeddings=False, scaled_residual_init=False, mlm_head=False,
                      n_layer=f.get("num_hidden_layers", 12), n_head=f.get("num_attention_heads", 12),
                      d_model=f.get("hidden_size", 768), d_ff=f.get("intermediate_size", 3072),
                      mlp=f.choice("hidden_act", "gelu", _ACT_IN), norm_eps=f.get("layer_norm_eps", 1e-12),
                      init_std=f.get("initializer_range", 0.02), dropout=dropout, image_size=side, patch_size=patch,
                      channels=f.get("num_channels", 3), n_classes=n_classes,
                      pooler="vit.pooler.dense.weight" in names, max_seq_len=(side // patch) ** 2 + 1)
    cfg.validate()
    return cfg


def _full_names(weights: dict) -> dict:
    """A bare ViTModel's / ViTMAEModel's names with the ``vit.`` prefix of the whole models."""
    if any(k.startswith("vit.") for k in weights):
        return weights
    return {k if k.startswith(("classifier.", "decoder.")) else f"vit.{k}": v for k, v in weights.items()}


def vit_folder_config(folder: Path, raw: dict, names, where: str) -> ModelConfig:
    return vit_config_from_hf(raw, str(folder / "config.json"), _full_names(dict.fromkeys(names)))


def import_vit(folder: Path, raw: dict, weights: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Our ViT (eval mode, float32) from a Hugging Face ViT / ViTMAE ``config.json`` and weights."""
    from ..model.vit import ViT

    weights = _full_names(weights)
    cfg = vit_config_from_hf(raw, str(folder / "config.json"), weights)
    model = ViT(cfg)
    expected = model.state_dict()
    ours, used = {}, set()
    for name, hf in vit_tensors(cfg):
        missing = [k for k in hf if k not in weights]
        if missing:
            raise PretrainerError(f"{where}: missing tensor '{missing[0]}'")
        tensor = torch.cat([weights[k] for k in hf]) if len(hf) > 1 else weights[hf[0]]
        if tensor.shape != expected[name].shape:
            shapes = " + ".join(f"{k} {list(weights[k].shape)}" for k in hf)
            raise PretrainerError(f"{where}: {shapes} does not fit {list(expected[name].shape)} expected from config.json")
        ours[name] = tensor.float()
        used.update(hf)
    mae_decoder = raw.get("model_type") == "vit_mae"
    unexpected = [k for k in weights if k not in used and not (mae_decoder and k.startswith("decoder."))]
    if unexpected:
        raise PretrainerError(f"{where}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for a ViT")
    model.load_state_dict(ours)
    return model.eval()
