"""Low-rank adapters (LoRA: Hu et al. 2021) on our plain models, through ``peft``.

``add_lora(model, settings)`` puts peft's LoRA layers in place of the linear layers that
``settings.targets`` names (``train.lora`` for continued pretraining, ``finetune --lora``): each
computes ``W x + (alpha / r) B A x``, W frozen, A [r, in] drawn (Kaiming-uniform) and B [out, r]
starting at zero, so the adapted model starts as the model. Every other weight of ``model`` is
frozen (``requires_grad=False``), so the optimizer gets the adapters only (fine-tuning adds the task
head, which lies outside the backbone that is adapted).

Checkpoints of an adapted model (:mod:`.checkpoint`) keep the frozen base weights in
``model.safetensors`` under the plain names, and the adapters beside them in peft's format:
``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` ...) and
``adapter_config.json``; ``peft.PeftModel.from_pretrained(model, checkpoint_folder)`` on our plain
model reads them as they are. Every reader of a run's weights gets them merged
(``W + alpha / r B A``: peft's ``merge_and_unload``), so ``generate``, ``evaluate``, ``export`` and
``init_from`` see the adapted model; resuming loads base and adapters apart.

For ``export --unmerged`` (:func:`hf_adapter`) the adapters are renamed after the Hugging Face
modules, through the same name table as the weights (:mod:`pretrainer.interop.hf`). Our fused
projections become several Hugging Face ones in some families (Llama's ``q_proj``, ``k_proj``,
``v_proj`` for our [q; k; v] ``attn.qkv``, BERT's ``query``, ``key``, ``value``, Llama's
``gate_proj`` and ``up_proj``): a rank-r update ``B A`` of the fused matrix is, row block by row
block, ``B_q A``, ``B_k A``, ``B_v A``, three rank-r LoRAs sharing A with B split by rows, which is
exactly what is exported (same r, same alpha). GPT-2's fused ``c_attn`` (a ``Conv1D``: peft's
``fan_in_fan_out``) takes the adapter as it is, GPT-NeoX's per-head row order gets B's rows
reordered. Mixture-of-experts MLPs are not adapted (the ``mlp`` targets match dense MLPs only).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from ..config import LoRAConfig
from ..errors import CheckpointError, ConfigError, PretrainerError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # what peft's PeftModel puts before the module names it saves
_BASE = ".base_layer"  # peft's name of an adapted layer's own (frozen) layer


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'pretrainer[lora]'") from None
    return peft


def target_modules(settings: LoRAConfig, model: nn.Module, where: str = "train.lora") -> list[str]:
    """The module names (``attn.qkv`` ...) of ``settings.targets`` that ``model`` has (cross-attention
    is an encoder-decoder's decoder's only); a ConfigError when an item of it names none."""
    from ..config import LORA_TARGETS

    settings.target_names(where)  # checks every item
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = []
    for item in str(settings.targets).split(","):
        item = item.strip()
        found = [n for n in LORA_TARGETS.get(item, (item,)) if any(m.endswith("." + n) for m in linear)]
        if not found:
            raise ConfigError(f"{where}.targets: '{item}' names no linear layer of this model (the "
                              f"experts of mixture-of-experts MLPs are not adapted)")
        names += [n for n in found if n not in names]
    return names


def peft_config(settings: LoRAConfig, model: nn.Module, where: str = "train.lora"):
    """peft's ``LoraConfig`` for ``settings`` on ``model``."""
    return _peft().LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                              target_modules=target_modules(settings, model, where), bias="none")


def add_lora(model: nn.Module, settings: LoRAConfig, where: str = "train.lora") -> nn.Module:
    """Put LoRA layers into ``model`` in place (peft's ``inject_adapter_in_model``) and freeze its
    other weights; returns ``model``."""
    inject = _peft().inject_adapter_in_model
    inject(peft_config(settings, model, where), model)
    for name, p in model.named_parameters():  # (peft froze them already; said here, not assumed)
        p.requires_grad_(".lora_" in name)
    return model


def adapted(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name prefix, module)`` of the module of ``model`` that holds LoRA layers (the backbone
    under a fine-tuning head, or ``model`` itself), or None."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "peft_config", None), dict):
            return (name + "." if name else ""), module
    return None


def base_state(state: dict) -> dict:
    """A state dict of an adapted model with its base weights under the plain names (an adapted
    layer's ``qkv.base_layer.weight`` is ``qkv.weight``) and without the adapters; unchanged
    without LoRA."""
    return {k.replace(_BASE + ".", "."): v for k, v in state.items() if ".lora_" not in k}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of ``model`` as peft saves them (``base_model.model.<module>.lora_A.weight``,
    module names as in ``model``'s state dict); empty without LoRA."""
    found = adapted(model)
    if found is None:
        return {}
    prefix, root = found
    own = _peft().get_peft_model_state_dict(root)
    return {f"{PREFIX}{prefix}{k}": v.detach().cpu().contiguous() for k, v in own.items()}


def write_adapter(model: nn.Module, folder: Path, write_safetensors) -> dict[str, tuple[int, str]]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (peft's ``save_pretrained``
    of the config) of ``model`` into ``folder`` (nothing without LoRA); returns each file's
    ``(size, sha256)`` for the checkpoint's state."""
    from .checkpoint import sha256_file

    tensors = adapter_tensors(model)
    if not tensors:
        return {}
    digests = {ADAPTER_WEIGHTS: write_safetensors(tensors, folder / ADAPTER_WEIGHTS)}
    adapted(model)[1].peft_config["default"].save_pretrained(str(folder))
    digests[ADAPTER_CONFIG] = ((folder / ADAPTER_CONFIG).stat().st_size, sha256_file(folder / ADAPTER_CONFIG))
    return digests


def read_adapter(folder: Path):
    """``(peft LoraConfig, tensors)`` of the adapter files in a checkpoint folder, or None when it
    has none."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    peft = _peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: cannot read its LoRA adapter ({e})") from None
    return config, tensors


def _strip(tensors: dict, prefix: str) -> dict:
    """The adapter tensors of the modules under ``prefix`` (``backbone.``), named from there,
    without peft's ``base_model.model.``."""
    lead = PREFIX + prefix
    return {k[len(lead):]: v for k, v in tensors.items() if k.startswith(lead)}


def load_adapter(model: nn.Module, folder: Path, prefix: str = "") -> bool:
    """After the base weights of a checkpoint were loaded into ``model``: its adapters, into the
    LoRA layers of an adapted ``model`` (resuming), or merged into the weights of a plain one
    (``prefix``: where the checkpointed module held ``model``, e.g. ``backbone.``). Returns whether
    the checkpoint had adapters. An adapted model needs them."""
    found = adapted(model)
    adapter = read_adapter(folder)
    if adapter is None:
        if found is not None:
            raise CheckpointError(f"{folder}: no LoRA adapter ({ADAPTER_CONFIG}) for this LoRA run")
        return False
    config, tensors = adapter
    peft = _peft()
    if found is not None:
        root_prefix, root = found
        own = _strip(tensors, root_prefix)
        result = peft.set_peft_model_state_dict(root, own)
        missing = _missing_adapters(root, result.missing_keys)
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: adapters do not match the model "
                                  f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
        return True
    merge(model, config, _strip(tensors, prefix), str(folder / ADAPTER_WEIGHTS))
    return True


@torch.no_grad()
def merge(model: nn.Module, config, tensors: dict, where: str = "adapter") -> nn.Module:
    """Merge adapters (named as in ``model``, without ``base_model.model.``) into the weights of
    the plain ``model``, in place: peft's LoRA layers are put in, loaded, then merged and removed
    (``merge_and_unload``: each weight becomes ``W + alpha / r B A``)."""
    peft = _peft()
    lora = peft.LoraModel(model, config, "default")
    result = peft.set_peft_model_state_dict(model, tensors)
    missing = _missing_adapters(model, result.missing_keys)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: adapters do not match the model (missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]})")
    lora.merge_and_unload()
    model.__dict__.pop("peft_config", None)  # (merge_and_unload leaves no LoRA layer behind)
    return model


def _missing_adapters(model: nn.Module, missing: list[str]) -> list[str]:
    """The adapter weights of ``missing`` that were not loaded under another name (a layer shared by
    several blocks, ALBERT's, is saved once)."""
    state = model.state_dict(keep_vars=True)
    gone = set(missing)
    loaded = {id(v) for k, v in state.items() if k not in gone}
    return [k for k in missing if ".lora_" in k and id(state[k]) not in loaded]


def summary(model: nn.Module, settings: LoRAConfig) -> str:
    """The first log line's LoRA part: rank, targets, trainable parameters (and their share),
    and the memory of the weights and of what training keeps per trainable weight (its gradient
    and AdamW's two moments) against training every weight."""
    params = list({id(p): p for p in model.parameters()}.values())  # a tied weight once
    total = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    state = 3 * sum(p.numel() * p.element_size() for p in trainable)
    full = 3 * weights
    names = sorted(adapted(model)[1].peft_config["default"].target_modules)
    return (f"LoRA r={settings.r} alpha={settings.alpha:g} on {', '.join(names)}: "
            f"{n:,} trainable parameters ({100 * n / total:.2f}% of {total:,}); memory: weights "
            f"{_mb(weights)} + gradients and AdamW moments {_mb(state)} (every weight trained: {_mb(full)})")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``model`` (a tied weight once)."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# Hugging Face: the adapter under the Hugging Face module names


def hf_adapter(cfg, config, tensors: dict, pad_token_id: int | None = None) -> tuple:
    """``(peft LoraConfig, adapter tensors)`` for ``peft.PeftModel.from_pretrained`` on
    the Hugging Face model that :func:`pretrainer.interop.hf.export_hf` writes for ``cfg``, from
    the adapters (``tensors``: ``<module>.lora_A.weight`` / ``lora_B``, our module names) that
    ``config`` describes. Each adapted module maps through the weights' name table: A as it is
    and B split by the rows of the Hugging Face pieces (and reordered per head for GPT-NeoX); the
    same rank and alpha, so every piece's update is the rows of ours. A module without an exact
    counterpart is refused in one line."""
    from ..interop.hf import _qkv_rows, _tensors, hf_family
    from ..model import make_model
    from .checkpoint import is_tied_copy

    family = hf_family(cfg)
    table = {t.ours: t for t in _tensors(cfg, family, pad_token_id)}
    probe = None
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    out, targets, conv1d = {}, [], set()
    for m in modules:
        a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
        t = table.get(f"{m}.weight")
        if t is None:
            if probe is None:
                with torch.device("meta"):
                    probe = make_model(cfg)
            if is_tied_copy(probe, f"{m}.weight"):  # a shared layer's other name (ALBERT): stored once
                continue
            raise PretrainerError(f"export --unmerged: the adapted layer {m} has no {family} counterpart; "
                                  f"export merged (without --unmerged)")
        if t.lead_rows or t.drop_rows:
            raise PretrainerError(f"export --unmerged: {m} is stored with shifted rows in {family}; "
                                  f"export merged (without --unmerged)")
        pieces = b.split(list(t.rows)) if t.rows else [b]
        for hf_name, piece in zip(t.hf, pieces):
            piece = _qkv_rows(piece, t.per_head, to_hf=True) if t.per_head else piece
            module = hf_name.removesuffix(".weight")
            out[f"{PREFIX}{module}.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
            out[f"{PREFIX}{module}.lora_B.weight"] = piece.clone(memory_format=torch.contiguous_format)
            targets.append(module)
            conv1d.add(t.conv1d)
    if len(conv1d) > 1:
        raise PretrainerError(f"export --unmerged: the adapted layers of this {family} model mix Conv1D and "
                              f"Linear layers, which one peft config cannot describe; export merged")
    hf = copy.deepcopy(config)
    hf.target_modules = targets
    hf.fan_in_fan_out = conv1d == {True}
    hf.task_type = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}.get(cfg.arch)
    hf.base_model_name_or_path, hf.inference_mode = None, True
    return hf, out


def export_unmerged(run: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """``export --unmerged``: the run's frozen base model as a Hugging Face folder ``out``
    (:func:`pretrainer.interop.hf.export_hf`) and its adapters in ``out/adapter`` for
    ``peft.PeftModel.from_pretrained(AutoModel...from_pretrained(out), out / "adapter")``."""
    base, ckpt, prefix = base_model(run)
    if read_adapter(ckpt) is None:
        raise PretrainerError(f"{run}: not a LoRA run (no {ADAPTER_CONFIG} in {ckpt}); export it without --unmerged")
    return export_adapted(base, ckpt, out, tokenizer_dir, prefix)


def export_adapted(base: nn.Module, ckpt: Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                   prefix: str = "") -> Path:
    """Write the plain model ``base`` as a Hugging Face folder ``out`` and the adapters of the
    checkpoint folder ``ckpt`` (those of the modules under ``prefix`` in it) as a peft folder
    ``out/adapter`` named after the Hugging Face modules (:func:`hf_adapter`)."""
    from safetensors.torch import save_file

    from ..errors import writing_folder
    from ..interop.hf import _write, export_hf
    from ..interop.hf_tokenizer import export_files

    config, tensors = read_adapter(ckpt)
    pad = None
    if tokenizer_dir is not None:
        pad = export_files(tokenizer_dir, base.cfg)[1].get("pad_token_id")
    hf, weights = hf_adapter(base.cfg, config, _strip(tensors, prefix), pad)  # refuses before writing
    folder = export_hf(base, out, tokenizer_dir=tokenizer_dir)
    with writing_folder(folder / "adapter", "export"):
        (folder / "adapter").mkdir(exist_ok=True)
        _write(folder / "adapter" / ADAPTER_WEIGHTS,
               lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
        hf.save_pretrained(str(folder / "adapter"))
    return folder


def base_model(run: str | Path) -> tuple[nn.Module, Path, str]:
    """``(plain model with the frozen base weights, checkpoint folder, prefix of the model in the
    checkpoint)`` of a pretraining or fine-tuning run (a fine-tuning run: its backbone)."""
    from ..api import find_run_files
    from ..config import config_from_file
    from ..finetune.backbone import _from_finetune_run, is_finetune_run
    from ..model import make_model
    from .checkpoint import load_weights

    p = Path(run)
    if is_finetune_run(p):
        backbone = _from_finetune_run(p, from_scratch=False, adapter=False)
        ckpt = Path(backbone.origin["checkpoint"])
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            prefix = "backbone." if any(k.startswith("backbone.") for k in f.keys()) else ""
        return backbone.model, ckpt, prefix
    config_file, ckpt = find_run_files(p)
    cfg = config_from_file(config_file)
    model = make_model(cfg.model)
    from .objectives import trained_module

    if trained_module(cfg, model) is not model:  # (ELECTRA: a generator beside the model)
        raise PretrainerError(f"{run}: an objective={cfg.objective} run trains no LoRA adapters")
    load_weights(model, ckpt, adapter=False)
    return model, ckpt, ""


def load_base(model: nn.Module, weights: dict) -> None:
    """Load plain-named weights (another run's, ``init_from``) into ``model``: into the base layers
    of its adapted modules, leaving the adapters as they are."""
    if adapted(model) is None:
        getattr(model, "load_initial_weights", model.load_state_dict)(weights)  # (a ViT's may keep a fresh head)
        return
    names = {k.replace(_BASE + ".", "."): k for k in model.state_dict() if ".lora_" not in k}
    unexpected = [k for k in weights if k not in names]
    if unexpected:
        raise CheckpointError(f"weights do not match the model (unexpected {unexpected[:3]})")
    result = model.load_state_dict({names[k]: v for k, v in weights.items()}, strict=False)
    missing = [k for k in result.missing_keys if ".lora_" not in k]
    if missing:
        raise CheckpointError(f"weights do not match the model (missing {missing[:3]})")


def check_run(cfg, mode: str, product: nn.Module, model: nn.Module) -> None:
    """A pretraining run with ``train.lora.r`` > 0 that LoRA cannot train: refused in one line."""
    r = cfg.train.lora.r
    if not cfg.init_from:
        raise ConfigError(f"train.lora.r={r}: LoRA adapts pretrained weights, which stay frozen; set "
                          f"init_from=RUN (a run, a checkpoint or a Hugging Face folder)")
    if mode == "fsdp":
        raise ConfigError(f"train.lora.r={r}: LoRA under train.parallel=fsdp is not supported (the meta-device "
                          f"initialisation would redraw the adapters); use train.parallel=ddp")
    if model is not product:
        raise ConfigError(f"train.lora.r={r}: objective={cfg.objective} trains more than the model it produces "
                          f"(its generator too); LoRA applies to objectives that train the model alone")
