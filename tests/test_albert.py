"""ALBERT (Lan et al. 2020): cross-layer parameter sharing (``model.share_layers``) and the ALBERT
presets, checked against references: Hugging Face ``AlbertModel``'s parameter count, the formula
for what each sharing mode removes, a shared weight's gradient as the sum of its layers' gradients,
checkpoints that store a shared tensor once and restore it tied, logit parity with
``AlbertForMaskedLM`` / ``AlbertModel`` both ways (built locally from random weights, every
parameter perturbed), and ``pretrainer finetune`` from an imported ALBERT folder and from an
``albert-tiny`` pretraining run."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from safetensors.torch import load_file

from pretrainer.config import RunConfig, TrainConfig, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.interop.hf import config_from_hf, export_hf, hf_family, import_hf, import_run
from pretrainer.model import build_model, make_model, model_config
from pretrainer.model.info import model_info
from pretrainer.train.checkpoint import latest_checkpoint, load_weights, save_checkpoint
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 300
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=V, max_seq_len=64, n_layer=3, d_model=32, n_head=4, d_ff=64, d_embed=16)


def _inputs(batch: int = 2, length: int = 20, seed: int = 1):
    """ids, two segments (0 then 1), and padding after position 15 of the second row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    types_ = torch.zeros_like(ids)
    types_[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return dict(input_ids=ids, token_type_ids=types_, attention_mask=mask)


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Sizes


def test_albert_base_v2_has_albertmodels_parameter_count():
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(  # albert-base-v2's published config.json
        vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_new",
        max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):
        hf = transformers.AlbertModel(config)
    assert _n(hf) == 11_683_584
    info = model_info(model_preset("albert-base-v2"))
    assert info["params"] == 11_683_584
    # the MLM head's own: dense 768 -> 128, its LayerNorm, the output bias (the matrix is tied)
    assert info["params_mlm_head"] == 768 * 128 + 128 + 2 * 128 + 30000
    model = build_model("albert-base-v2", device="meta")
    assert _n(model) == 11_683_584 + info["params_mlm_head"]
    assert all(b is model.blocks[0] for b in model.blocks)


@pytest.mark.parametrize("mode", ["none", "all", "attention", "ffn"])
def test_each_sharing_mode_removes_what_it_shares_from_the_count(mode):
    """ALBERT's Table 4 ablation: what L - 1 layers no longer hold (norms stay per layer under
    attention / ffn sharing, and go with the block under all)."""
    plain = build_model("albert-tiny", **SMALL, share_layers="none")
    block = plain.blocks[0]
    saved = {"none": 0, "all": _n(block), "attention": _n(block.attn), "ffn": _n(block.mlp)}[mode]
    model = build_model("albert-tiny", **SMALL, share_layers=mode)
    assert _n(model) == _n(plain) - (SMALL["n_layer"] - 1) * saved
    for b in model.blocks[1:]:
        assert (b is model.blocks[0]) == (mode == "all")
        assert (b.attn is model.blocks[0].attn) == (mode in ("all", "attention"))
        assert (b.mlp is model.blocks[0].mlp) == (mode in ("all", "ffn"))
        assert (b.norm1 is model.blocks[0].norm1) == (mode == "all")
    # sharing saves parameters, not compute: the FLOPs per token stay those of the unshared model
    a, b = model_info(model.cfg), model_info(plain.cfg)
    assert a["params"] == b["params"] - (SMALL["n_layer"] - 1) * saved
    assert a.get("params_reused", 0) == (SMALL["n_layer"] - 1) * saved
    assert (a["flops_per_token"], a["flops_per_token_kaplan"]) == (b["flops_per_token"], b["flops_per_token_kaplan"])


def test_a_shared_weight_gets_the_sum_of_its_layers_gradients():
    """The shared model is the unshared one with every layer holding copies of one layer's weights:
    same logits, and the shared tensor's gradient is the sum of the copies' gradients."""
    torch.manual_seed(0)
    shared = _perturb(build_model("albert-tiny", **SMALL, share_layers="all"))
    plain = build_model("albert-tiny", **SMALL, share_layers="none").eval()
    state = {k: v for k, v in shared.state_dict().items()}
    plain.load_state_dict(state)  # every blocks.i.* of the shared model's state dict is blocks.0's
    x = _inputs()
    a, b = shared(**x).logits, plain(**x).logits
    torch.testing.assert_close(a, b, **TOL)
    a.square().mean().backward()
    b.square().mean().backward()
    for name, p in shared.blocks[0].named_parameters():
        total = sum(dict(blk.named_parameters())[name].grad for blk in plain.blocks)
        torch.testing.assert_close(p.grad, total, **TOL)


def test_sharing_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="model.share_layers='every': expected one of none, all"):
        model_config("albert-tiny", vocab_size=V, share_layers="every")
    with pytest.raises(ConfigError, match="model.share_layers=all .* applies to arch=encoder only"):
        model_config("gpt-nano", vocab_size=V, share_layers="all")
    cfg = model_preset("albert-tiny")
    cfg.vocab_size, cfg.share_layers = V, "ffn"
    cfg.moe.n_experts = 4
    with pytest.raises(ConfigError, match="model.share_layers=ffn shares the MLPs"):
        cfg.validate()


def test_fsdp_refuses_shared_blocks_in_one_line():
    from pretrainer.train.parallel import parallelize

    model = build_model("albert-tiny", **SMALL)
    env = types.SimpleNamespace(world=2, compile=False, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="model.share_layers=all: train.parallel=fsdp .* use train.parallel=ddp"):
        parallelize(model, None, env, TrainConfig(parallel="fsdp"))


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("mode", ["all", "attention"])
def test_checkpoint_stores_a_shared_tensor_once_and_restores_it_tied(tmp_path, mode):
    torch.manual_seed(0)
    model = _perturb(build_model("albert-tiny", **SMALL, share_layers=mode))
    folder = save_checkpoint(tmp_path, model, None, {"step": 0, "samples": 0, "tokens": 0})
    stored = load_file(str(folder / "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" in stored and "blocks.2.attn.qkv.weight" not in stored
    assert ("blocks.2.norm1.weight" in stored) == (mode == "attention")
    assert ("blocks.2.mlp.up.weight" in stored) == (mode == "attention")
    assert sum(t.numel() for t in stored.values()) == _n(model)  # every parameter once
    fresh = build_model("albert-tiny", **SMALL, share_layers=mode)
    load_weights(fresh, folder)
    assert fresh.blocks[2].attn is fresh.blocks[0].attn
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with torch.no_grad():
        fresh.blocks[0].attn.qkv.weight.add_(1.0)  # still one tensor after loading
    assert torch.equal(fresh.blocks[2].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)


def _pretrain_cfg(data, out, **train_kw) -> RunConfig:
    model = model_preset("albert-tiny")
    model.n_layer, model.d_model, model.d_embed, model.n_head, model.max_seq_len = 3, 32, 16, 2, 64
    model.dropout = 0.1  # so that exact resume also needs the RNG state
    kw = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
              eval_batches=2, log_every=3, checkpoint_every=6, plot=False)
    kw.update(train_kw)
    return RunConfig(model=model, data=str(data), out=str(out), objective="mlm", train=TrainConfig(**kw))


def _logged(run, key):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def albert_run(synthetic_data, tmp_path_factory):
    from pretrainer.train.trainer import train

    run = tmp_path_factory.mktemp("albert") / "run"
    train(_pretrain_cfg(synthetic_data, run), quiet=True)
    return run


def test_albert_tiny_pretrains_with_mlm_and_resumes_bit_exact(albert_run, synthetic_data, tmp_path):
    from pretrainer.train.trainer import resume_config, train

    part = tmp_path / "part"
    train(_pretrain_cfg(synthetic_data, part), stop_at=6, quiet=True)
    train(resume_config(part), resume=True, quiet=True)
    for key in ("loss", "val_loss"):
        a, b = _logged(albert_run, key), _logged(part, key)
        assert a == b and len(a) >= 3, key
    losses = _logged(albert_run, "loss")
    assert losses[12] < losses[3]
    import pretrainer

    model = pretrainer.load(albert_run)
    assert model.cfg.share_layers == "all" and model.blocks[1] is model.blocks[0]


# ----------------------------------------------------------------------------------------------
# Hugging Face parity


def _hf_albert(seed: int = 1, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    return transformers, _perturb(transformers.AlbertForMaskedLM(config), seed)


@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
def test_import_albert_for_masked_lm_gives_same_logits(tmp_path, act):
    _, hf = _hf_albert(hidden_act=act)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.share_layers == "all" and ours.cfg.d_embed == 16 and ours.pooler is None
    assert all(b is ours.blocks[0] for b in ours.blocks)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, hf(**x).logits, **TOL)


def test_export_loads_in_albert_for_masked_lm_and_albert_model_with_same_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _perturb(build_model("albert-tiny", **SMALL))
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["embedding_size"], config["num_hidden_groups"]) == ("albert", 16, 1)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(hf, transformers.AlbertForMaskedLM)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) <= {"albert.pooler.weight", "albert.pooler.bias"}
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, hf.eval()(**x).logits, **TOL)
    # the backbone with its pooler loads in AlbertModel: nothing missing, only the MLM head left over
    base, info = transformers.AlbertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["mismatched_keys"]), info
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"predictions"}
    with torch.no_grad():
        h = ours(**x).hidden_states
        ref = base.eval()(**x)
    torch.testing.assert_close(h, ref.last_hidden_state, **TOL)
    torch.testing.assert_close(ours.pooled(h), ref.pooler_output, **TOL)


def test_round_trip_keeps_config_and_weights(tmp_path):
    ours = _perturb(build_model("albert-tiny", **SMALL))
    export_hf(ours, tmp_path)
    back = import_hf(tmp_path)
    assert dataclasses.replace(back.cfg, preset=None, dropout=ours.cfg.dropout) == dataclasses.replace(
        ours.cfg, preset=None)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("field,value", [("num_hidden_groups", 3), ("inner_group_num", 2),
                                         ("position_embedding_type", "relative_key"),
                                         ("tie_word_embeddings", False), ("hidden_act", "silu")])
def test_import_refuses_albert_fields_it_cannot_honour(field, value):
    transformers, hf = _hf_albert()
    raw = dict(hf.config.to_dict(), **{field: value})
    with pytest.raises(PretrainerError, match=rf"^cfg.json: {field}={value!r} has no pretrainer equivalent"):
        config_from_hf(raw, "cfg.json")
    raw = dict(hf.config.to_dict(), embedding_size=32)
    with pytest.raises(PretrainerError, match="embedding_size=32 equals hidden_size"):
        config_from_hf(raw, "cfg.json")


@pytest.mark.parametrize("overrides,named", [
    (dict(share_layers="attention"), "model.share_layers='attention'"),
    (dict(share_layers="ffn"), "model.share_layers='ffn'"),
    (dict(d_embed=None), "model.d_embed=None"),
    (dict(prenorm=True), "model.prenorm=True"),
    (dict(type_vocab_size=0), "model.type_vocab_size=0"),
])
def test_export_refuses_what_albert_cannot_express(overrides, named):
    cfg = model_config("albert-tiny", **dict(SMALL, **overrides))
    with pytest.raises(PretrainerError, match=f"^{named} has no Hugging Face equivalent"):
        hf_family(cfg)


# ----------------------------------------------------------------------------------------------
# Fine-tuning


def _sentiment(path, n, seed):
    import random

    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice("the a movie plot was quite".split()) for _ in range(4)]
        words.insert(rng.randint(0, 4), rng.choice(("good great fine" if y else "bad awful poor").split()))
        lines.append(f"{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _finetune_from(source, tmp_path, name):
    from pretrainer.cli import main
    from pretrainer.finetune.backbone import load_backbone

    train_file, dev = _sentiment(tmp_path / "train.tsv", 64, 0), _sentiment(tmp_path / "dev.tsv", 16, 1)
    out = tmp_path / name
    code = main(["finetune", str(source), "--train", str(train_file), "--eval", str(dev), "--out", str(out),
                 "--task", "classification", "--epochs", "1", "--lr", "1e-3", "--batch-size", "16",
                 "--max-len", "16", "--seed", "1", "--quiet"])
    assert code in (0, None)
    import yaml

    result = yaml.safe_load((out / "config.yaml").read_text())["best"]["metrics"]
    assert 0.0 <= result["accuracy"] <= 1.0
    ckpt, _ = latest_checkpoint(out)
    stored = load_file(str(ckpt / "model.safetensors"))
    assert "backbone.blocks.0.attn.qkv.weight" in stored and "backbone.blocks.1.attn.qkv.weight" not in stored
    again = load_backbone(str(out))  # a fine-tuning run as the next backbone: shared weights restored tied
    assert again.model.blocks[1] is again.model.blocks[0]
    assert torch.equal(again.model.blocks[0].attn.qkv.weight, stored["backbone.blocks.0.attn.qkv.weight"])
    return result


def test_finetune_from_an_imported_albert_folder(tmp_path):
    from pretrainer.tokenization import Tok

    tok = Tok.train(["the a movie plot was quite good great fine bad awful poor"] * 3, "wordpiece", 60)
    tok.save(tmp_path / "tok")
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(vocab_size=tok.vocab_size, embedding_size=16, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AlbertForMaskedLM(config).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json",):
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    _finetune_from(tmp_path / "hf", tmp_path, "ft-hf")
    import_run(tmp_path / "hf", tmp_path / "imported")  # and as a run folder
    _finetune_from(tmp_path / "imported", tmp_path, "ft-imported")


def test_finetune_from_an_albert_tiny_run(albert_run, tmp_path):
    _finetune_from(albert_run, tmp_path, "ft-run")


def test_memory_plan_counts_a_shared_block_once_and_offers_ddp_only():
    from pretrainer.model.plan import _parameter_units, plan

    cfg = model_config("albert-tiny", **SMALL)
    units = _parameter_units(cfg)
    model = make_model(cfg)
    assert units["params"] == _n(model)
    assert units["root"] == _n(model) - _n(model.blocks[0]) and units["largest_block"] == _n(model.blocks[0])
    result = plan(cfg, devices=2, device_memory_bytes=8e9)
    assert {r["parallel"] for r in result["rows"]} == {"ddp"} and "fsdp" not in result["verdict"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_of_shared_blocks_leaves_the_step_unchanged(mode):
    from conftest import objective
    from pretrainer.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = _perturb(build_model("albert-tiny", **SMALL)).train()
    wrapped = build_model("albert-tiny", **SMALL).train()
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, mode)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # names unchanged
    x = _inputs()
    labels = torch.full_like(x["input_ids"], -100)
    labels[:, 3::5] = x["input_ids"][:, 3::5]
    batch = dict(x, labels=labels)
    grads = []
    for model in (plain, wrapped):
        loss = objective("mlm", model).loss(model, batch)
        params = [p for name, p in model.named_parameters() if not name.startswith("pooler")]  # unused by mlm
        grads.append((loss, torch.autograd.grad(loss, params)))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, **TOL)


def test_albert_for_pretraining_sentence_order_head_both_ways(tmp_path):
    """AlbertForPreTraining (the MLM head and the sentence-order head ``sop_classifier`` on the pooled
    state, which ``mlm+sop`` trains): both heads' logits to 1e-5, import and export."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(3)
    hf = _perturb(transformers.AlbertForPreTraining(config), 3).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.nsp_head and ours.pooler is not None
    x = _inputs()
    with torch.no_grad():
        a, b = ours(**x), hf(**x)
    torch.testing.assert_close(a.logits, b.prediction_logits, **TOL)
    torch.testing.assert_close(a.nsp_logits, b.sop_logits, **TOL)
    export_hf(ours, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["AlbertForPreTraining"]
    again, info = transformers.AlbertForPreTraining.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**x).sop_logits, b.sop_logits, **TOL)
