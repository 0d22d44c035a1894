"""LoRA through peft (issue 17): only the adapters train (every base weight bit for bit as it was),
exact resume, adapters in peft's format beside the checkpoints, the merged export's logits equal the
adapted model's and load in ``transformers``, and the unmerged export (base + adapter renamed after
the Hugging Face modules) gives the same logits under ``peft.PeftModel.from_pretrained``, for the
three model kinds and the fused projections each family splits differently."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrainer.config import LoRAConfig, load_config
from pretrainer.errors import ConfigError
from pretrainer.model import build_model, make_model
from pretrainer.train import lora
from pretrainer.train.checkpoint import latest_checkpoint, load_weights, save_checkpoint
from pretrainer.train.trainer import resume_config, train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
V = 97


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every weight moved by scale x N(0, 1) (B of the adapters is zero until then)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


# (preset, model options, LoRA targets, Hugging Face class): GPT-2's fused c_attn is a Conv1D
# (fan_in_fan_out), Llama splits qkv into q/k/v with grouped-query heads and [gate; up] into two,
# GPT-NeoX keeps one fused matrix with its rows per head, BERT splits qkv into query/key/value (as
# ALBERT, whose one layer is shared by all), T5 and BART adapt the decoder's cross-attention q and [k; v] too
FAMILIES = {
    "gpt2": ("gpt2-small", dict(n_layer=2, d_model=32, n_head=4), "attention,mlp", "AutoModelForCausalLM"),
    "llama": ("llama-tiny", dict(n_layer=2, d_model=32, n_head=4, n_kv_heads=2, d_ff=48), "attention,mlp",
              "AutoModelForCausalLM"),
    "neox": ("llama-tiny", dict(n_layer=2, d_model=32, n_head=4, n_kv_heads=None, d_ff=48, norm="layernorm",
                                bias=True, mlp="gelu", parallel_block=True, rope_fraction=0.25),
             "attention", "AutoModelForCausalLM"),
    "bert": ("bert-tiny", dict(n_layer=2, d_model=32, n_head=2, d_ff=48, pooler=False), "attention,mlp", "AutoModelForMaskedLM"),
    "albert": ("albert-tiny", dict(n_layer=3, d_model=32, n_head=2, d_ff=48, d_embed=16, pooler=False),
               "attention,mlp", "AutoModelForMaskedLM"),  # one layer shared by all: its adapters too
    "t5": ("t5-tiny", dict(n_layer=2, d_model=32, n_head=4, d_ff=48), "attention,mlp", "AutoModelForSeq2SeqLM"),
    "bart": ("bart-tiny", dict(n_layer=1, n_decoder_layer=2, d_model=32, n_head=4, d_ff=48), "attention",
             "AutoModelForSeq2SeqLM"),
}


def _logits(model, arch: str, hf: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, V, (2, 12), generator=g)
    with torch.no_grad():
        if arch == "encoder-decoder":
            y = torch.randint(3, V, (2, 7), generator=g)
            return (model(input_ids=x, decoder_input_ids=y) if hf else model(x, decoder_input_ids=y)).logits
        return model(x).logits


SLOW_FAMILIES = ("neox", "albert", "bart")  # the default run keeps one family of each layout


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f
                                    for f in FAMILIES])
def test_merged_and_unmerged_exports_give_the_adapted_models_logits(family, tmp_path):
    preset, options, targets, hf_class = FAMILIES[family]
    torch.manual_seed(0)
    model = _perturb(build_model(preset, vocab_size=V, max_seq_len=32, **options), 0)
    cfg = model.cfg
    base_logits = _logits(model, cfg.arch)
    lora.add_lora(model, LoRAConfig(r=4, alpha=8, targets=targets)).eval()  # (dropout off)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained adapters, as it were (B starts at zero)
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ours = _logits(model, cfg.arch)
    assert (ours - base_logits).abs().max() > 0.1  # the adapters change the outputs
    ckpt = save_checkpoint(tmp_path / "run", model, None, {"step": 1})
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in ckpt.iterdir()}

    # merged: a plain model reads base + adapters as one set of weights, which transformers loads
    merged = make_model(cfg)
    load_weights(merged, ckpt)
    torch.testing.assert_close(_logits(merged.eval(), cfg.arch), ours, **TOL)
    from pretrainer.interop.hf import export_hf

    export_hf(merged, tmp_path / "merged")
    auto = getattr(transformers, hf_class)
    hf, info = auto.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    torch.testing.assert_close(_logits(hf.eval(), cfg.arch, hf=True), ours, **TOL)

    # unmerged: the frozen base, and the adapters renamed after the Hugging Face modules
    base = make_model(cfg)
    load_weights(base, ckpt, adapter=False)
    lora.export_adapted(base, ckpt, tmp_path / "unmerged")
    hf = auto.from_pretrained(tmp_path / "unmerged").eval()
    torch.testing.assert_close(_logits(hf, cfg.arch, hf=True), base_logits, **TOL)  # the base alone
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "unmerged" / "adapter").eval()
    torch.testing.assert_close(_logits(adapted, cfg.arch, hf=True), ours, **TOL)

    # and peft reads the run's own adapter folder onto our plain model as it is
    plain = make_model(cfg)
    load_weights(plain, ckpt, adapter=False)
    again = peft.PeftModel.from_pretrained(plain, ckpt).eval()
    torch.testing.assert_close(_logits(again, cfg.arch), ours, **TOL)


# ----------------------------------------------------------------------------------------------
# Training: continued pretraining (train.lora) and fine-tuning (--lora)


COMMON = ["train.seq_len=32", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
          "train.plot=false", "train.warmup_steps=0"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run)[0] / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(synthetic_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "gpt"
    train(load_config(None, COMMON + ["model=gpt-nano", f"data={synthetic_data}", f"out={run}", "train.max_steps=2"]),
          quiet=True)
    return run


def test_continued_pretraining_trains_the_adapters_only_and_resumes_exactly(base_run, synthetic_data, tmp_path,
                                                                            capsys):
    lora_run = COMMON + [f"data={synthetic_data}", f"init_from={base_run}", "train.lora.r=4", "train.lr=1e-2",
                         "train.max_steps=4", "train.checkpoint_every=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(load_config(None, lora_run + [f"out={whole}"]))
    first = capsys.readouterr().err.splitlines()[0]
    cfg = load_config(None, ["model=gpt-nano"]).model
    d = cfg.d_model  # each layer: qkv's A [4, d] and B [3d, 4], proj's A [4, d] and B [d, 4]
    n = cfg.n_layer * (4 * (d + 3 * d) + 4 * (d + d))
    total = sum(v.numel() for v in _weights(base_run).values()) + n
    assert f"LoRA r=4 alpha=16 on attn.proj, attn.qkv: {n:,} trainable parameters " \
           f"({100 * n / total:.2f}% of {total:,}); memory: weights" in first, first

    # every base weight bit for bit as init_from gave it; the adapters (B from zero) trained
    before, after = _weights(base_run), _weights(whole)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ckpt, state = latest_checkpoint(whole)
    adapters = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(adapters) == cfg.n_layer * 2 * 2 and all(k.startswith("base_model.model.blocks.") for k in adapters)
    assert all(adapters[k].abs().sum() > 0 for k in adapters if "lora_B" in k)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(state["sha256"])  # verified on read
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 16, ["attn.proj", "attn.qkv"])
    moments = {k.split(".")[0] for k in load_file(str(ckpt / "optimizer.safetensors"))}
    assert len(moments) == len(adapters)  # the optimizer holds the adapters' state only

    # stopped at step 2 and resumed: the losses of the run that never stopped, bit for bit
    train(load_config(None, lora_run + [f"out={part}"]), stop_at=2, quiet=True)
    train(resume_config(part), resume=True, quiet=True)
    assert _losses(part) == _losses(whole) and len(_losses(whole)) == 4
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(latest_checkpoint(part)[0] / "adapter_model.safetensors")).values(),
                                                  adapters.values()))

    # readers get the adapters merged in; export merged and unmerged give the same logits
    from pretrainer import load
    from pretrainer.cli import main

    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load(whole)(ids).logits
        assert (ours - load(base_run)(ids).logits).abs().max() > 1e-3
    assert main(["export", str(whole), "--out", str(tmp_path / "merged")]) in (0, None)
    assert main(["export", str(whole), "--out", str(tmp_path / "unmerged"), "--unmerged"]) in (0, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "unmerged").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "unmerged" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, **TOL)
        torch.testing.assert_close(adapted(ids).logits, ours, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "encoder-decoder"])
def test_lora_pretraining_of_the_other_model_kinds_keeps_the_base(kind, synthetic_data, tmp_path):
    model = (["model=bert-tiny", "objective=mlm", "model.vocab_size=null", f"data={synthetic_data}"]
             if kind == "encoder" else
             ["model=bart-tiny", "objective=denoise", "model.n_layer=1", "model.d_model=64", "model.d_ff=96",
              "model.vocab_size=null", f"data={synthetic_data}"])
    train(load_config(None, COMMON + model + [f"out={tmp_path / 'base'}", "train.max_steps=1"]), quiet=True)
    train(load_config(None, COMMON + model + [f"out={tmp_path / 'lora'}", f"init_from={tmp_path / 'base'}",
                                              "train.lora.r=2", "train.lora.targets=attention,mlp",
                                              "train.max_steps=2", "train.lr=1e-2"]), quiet=True)
    before, after = _weights(tmp_path / "base"), _weights(tmp_path / "lora")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapters = load_file(str(latest_checkpoint(tmp_path / "lora")[0] / "adapter_model.safetensors"))
    modules = {re.sub(r"^base_model\.model\.((en|de)coder\.)?blocks\.\d+\.", "", k.split(".lora_")[0])
               for k in adapters}
    both = {"attn.qkv", "attn.proj", "mlp.up", "mlp.down"}  # an encoder-decoder's decoder: cross-attention too
    assert modules == (both if kind == "encoder" else both | {"xattn.q", "xattn.kv", "xattn.proj"})


def test_lora_settings_are_checked_in_one_line(base_run, synthetic_data, tmp_path):
    run = COMMON + [f"data={synthetic_data}", f"out={tmp_path / 'r'}", "train.lora.r=4"]
    with pytest.raises(ConfigError, match=r"train.lora.r=4: LoRA adapts pretrained weights.*init_from"):
        train(load_config(None, run), quiet=True)
    with pytest.raises(ConfigError, match=r"train.lora.targets: 'atention'.*did you mean 'attention'"):
        load_config(None, run + ["train.lora.targets=atention"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match=r"train.lora.alpha=0"):
        load_config(None, run + ["train.lora.alpha=0"]).validate(need_paths=False)
    cfg = load_config(None, run + [f"init_from={base_run}"])
    with pytest.raises(ConfigError, match="train.parallel=fsdp is not supported.*ddp"):
        lora.check_run(cfg, "fsdp", None, None)
    moe = build_model("mixtral-tiny", n_layer=1, d_model=32, vocab_size=V)
    with pytest.raises(ConfigError, match="'mlp' names no linear layer.*experts"):
        lora.add_lora(moe, LoRAConfig(r=2, targets="attention,mlp"))
    from pretrainer.errors import PretrainerError

    model = build_model("gpt2-small", n_layer=1, d_model=32, n_head=2, vocab_size=V)
    with pytest.raises(PretrainerError, match="blocks.0.attn.gate has no gpt2 counterpart.*without --unmerged"):
        lora.hf_adapter(model.cfg, peft.LoraConfig(r=2), {"blocks.0.attn.gate.lora_A.weight": torch.zeros(2, 32),
                                                          "blocks.0.attn.gate.lora_B.weight": torch.zeros(32, 2)})


def _finetune_kw(tmp_path: Path, source: Path) -> dict:
    from test_finetune import sentiment_tsv

    train_file = sentiment_tsv(tmp_path / "train.tsv", 64, 1)
    dev = sentiment_tsv(tmp_path / "dev.tsv", 32, 2)
    return dict(source=str(source), task="classification", train=str(train_file), eval=str(dev), epochs=2,
                batch_size=16, lr=1e-2, max_len=16, seed=3, quiet=True, log_every=1, device="cpu", dropout=0.0,
                lora=True, lora_r=4, lora_dropout=0.0)


def _lora_finetune(tmp_path: Path, base_run: Path, capsys, **kw) -> Path:
    """A LoRA fine-tuning run: its first line, the backbone bit for bit its source's, the head
    trained, the adapters beside the kept weights."""
    from pretrainer.finetune import Predictor
    from pretrainer.finetune.runner import finetune

    finetune(out=str(tmp_path / "whole"), **dict(_finetune_kw(tmp_path, base_run), quiet=False, **kw))
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fine-tuning")][0]
    assert "; LoRA r=4 alpha=16 on attn.proj, attn.qkv: " in first and "trainable parameters" in first, first
    source, tuned = _weights(base_run), _weights(tmp_path / "whole")
    backbone = {k.removeprefix("backbone."): v for k, v in tuned.items() if k.startswith("backbone.")}
    assert backbone.keys() == source.keys() and all(torch.equal(backbone[k], source[k]) for k in source)
    assert {k for k in tuned if not k.startswith("backbone.")} == {"head.out.weight", "head.out.bias"}
    ckpt = latest_checkpoint(tmp_path / "whole")[0]
    assert all(k.startswith("base_model.model.backbone.blocks.")
               for k in load_file(str(ckpt / "adapter_model.safetensors")))
    assert [p["label"] for p in Predictor(tmp_path / "whole").predict(["a lovely film"])] in (["0"], ["1"])
    return tmp_path / "whole"


def test_fine_tuning_with_lora_freezes_the_backbone(base_run, tmp_path, capsys):
    _lora_finetune(tmp_path, base_run, capsys, epochs=1)


@pytest.mark.slow
def test_lora_fine_tuning_resumes_and_exports(base_run, tmp_path, capsys):
    from pretrainer import load
    from pretrainer.cli import main
    from pretrainer.finetune.runner import finetune, resume_finetune

    _lora_finetune(tmp_path, base_run, capsys)
    kw = _finetune_kw(tmp_path, base_run)
    finetune(out=str(tmp_path / "part"), stop_at=3, **kw)  # mid-epoch 1 (4 steps an epoch)
    resume_finetune(str(tmp_path / "part"), quiet=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")
    assert (tmp_path / "part" / "predictions.jsonl").read_text() == (tmp_path / "whole" / "predictions.jsonl").read_text()

    # the fine-tuned backbone (adapters merged) and its unmerged export under peft
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load(tmp_path / "whole")(ids).logits
    assert main(["export", str(tmp_path / "whole"), "--out", str(tmp_path / "hf"), "--unmerged"]) in (0, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, ours, **TOL)
    capsys.readouterr()
    assert main(["export", str(base_run), "--out", str(tmp_path / "no"), "--unmerged"]) == 2
    assert "not a LoRA run" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_fine_tuning_on_two_processes_matches_one(base_run, tmp_path):
    """DDP over gloo (torchrun): the adapters' gradients averaged over the processes, the frozen
    weights left out of the reduction."""
    import os
    import subprocess
    import sys

    import numpy as np

    from pretrainer.finetune.runner import finetune

    kw = dict(_finetune_kw(tmp_path, base_run), epochs=1)
    finetune(out=str(tmp_path / "one"), **kw)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(kw, out=str(tmp_path / "two"))))
    worker = Path(__file__).parent / "helpers" / "finetune_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(spec)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    a = load_file(str(latest_checkpoint(tmp_path / "one")[0] / "adapter_model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "two")[0] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
