"""The memory planner (`pretrainer info MODEL --plan`): verdicts, invariants, and its counts
checked against independent ones (model_info's parameters, the tensors autograd actually saves)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from pretrainer.cli import main
from pretrainer.config import model_preset
from pretrainer.errors import ConfigError
from pretrainer.model.fast import apply_fast_paths
from pretrainer.model.info import model_info
from pretrainer.model.layers import Block, Rotary
from pretrainer.model.plan import layer_activation_bytes, parse_memory, plan


def rows(result, parallel):
    return {r["checkpointing"]: r for r in result["rows"] if r["parallel"] == parallel}


def test_llama2_7b_on_8x80gb_fits_with_fsdp_not_ddp(capsys):
    assert main(["info", "llama2-7b", "--plan", "--devices", "8", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("fits with fsdp (max micro-batch"), verdict
    assert "does not fit with ddp" in verdict, verdict

    assert main(["info", "llama2-7b", "--plan", "--devices", "8", "--device-memory", "80GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ddp, fsdp = rows(result, "ddp"), rows(result, "fsdp")
    assert set(ddp) == set(fsdp) == {"none", "selective", "full"}
    # 6,738,415,616 x 16 B = 107.8 GB of model state alone, more than 80 GB per device
    assert ddp["none"]["model_state_bytes"] == 16 * 6_738_415_616 > 80e9
    assert not any(r["fits"] or r["max_micro_batch"] for r in ddp.values())
    assert all(r["fits"] and r["max_micro_batch"] >= 1 for r in fsdp.values())
    # recomputing more keeps less: full >= selective >= none in micro-batch, <= in bytes per sequence
    per_seq = [fsdp[m]["activations_per_sequence_bytes"] for m in ("none", "selective", "full")]
    assert per_seq == sorted(per_seq, reverse=True) and len(set(per_seq)) == 3
    assert fsdp["full"]["max_micro_batch"] > fsdp["selective"]["max_micro_batch"] >= fsdp["none"]["max_micro_batch"]


def test_gpt2_small_fits_on_one_80gb_device_with_ddp():
    result = plan(model_preset("gpt2-small"), devices=1, device_memory_bytes=parse_memory("80GB"))
    assert all(r["fits"] and r["max_micro_batch"] >= 8 for r in rows(result, "ddp").values())
    assert result["verdict"].startswith("fits with ddp")


def test_model_state_is_16_bytes_per_parameter_as_model_info_counts_them():
    for name in ("gpt2-small", "bert-base", "t5-small", "llama-tiny"):
        cfg = model_preset(name)
        cfg.vocab_size = cfg.vocab_size or 1000
        info = model_info(cfg)
        result = plan(cfg, devices=4)
        stored = info["params"] + info.get("params_mlm_head", 0)  # BERT's MLM head trains too
        assert result["params"] == stored, name
        ddp = rows(result, "ddp")["none"]
        assert ddp["model_state_bytes"] == 16 * stored == info["memory_bytes"]["training_state_adamw"], name
        assert rows(result, "fsdp")["none"]["model_state_bytes"] == 16 * stored / 4, name


def test_one_device_fsdp_has_the_ddp_model_state():
    for name in ("gpt2-small", "llama2-7b", "t5-small"):
        result = plan(model_preset(name), devices=1)
        ddp, fsdp = rows(result, "ddp"), rows(result, "fsdp")
        for mode in ddp:
            for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "model_state_bytes",
                        "activations_per_sequence_bytes"):
                assert fsdp[mode][key] == ddp[mode][key], (name, mode, key)


def test_max_micro_batch_grows_with_device_memory():
    for name, devices in (("gpt2-small", 1), ("llama2-7b", 8), ("t5-base", 2), ("bert-base", 1)):
        cfg = model_preset(name)
        previous = None
        for gb in (8, 16, 24, 40, 48, 80, 96, 141, 192):
            result = plan(cfg, devices=devices, device_memory_bytes=gb * 1e9)
            now = [r["max_micro_batch"] for r in result["rows"]]
            if previous is not None:
                assert all(b >= a for a, b in zip(previous, now)), (name, gb, previous, now)
            previous = now
        assert any(previous), name  # something fits on the largest device


def test_a_given_micro_batch_is_checked_against_the_largest():
    cfg = model_preset("llama2-7b")
    largest = rows(plan(cfg, devices=8), "fsdp")["full"]["max_micro_batch"]
    at = rows(plan(cfg, devices=8, micro_batch=largest), "fsdp")["full"]
    over = rows(plan(cfg, devices=8, micro_batch=largest + 1), "fsdp")["full"]
    assert at["fits"] and not over["fits"] and at["total_bytes"] <= 80e9 < over["total_bytes"]
    only = plan(cfg, devices=8, checkpointing="selective")
    assert {r["checkpointing"] for r in only["rows"]} == {"selective"}


def test_every_architecture_plans_and_encoder_decoder_counts_both_stacks():
    for name in ("gpt2-small", "llama3-8b", "bert-base", "t5-small", "bart-base", "t5-v1_1-small"):
        result = plan(model_preset(name), devices=2, device_memory_bytes=40e9)
        assert len(result["rows"]) == 6 and result["verdict"], name
    t5 = model_preset("t5-small")
    both = plan(t5)["rows"][0]["activations"]["layers"]
    encoder_only = plan(dataclasses.replace(t5, arch="encoder", mlm_head=False))["rows"][0]["activations"]["layers"]
    # the decoder's blocks are larger than the encoder's: they also cross-attend
    assert both > 2 * encoder_only


def test_none_matches_korthikanti_for_a_gpt_layer():
    # Korthikanti et al. (2022), section 4.1: sbh x 34 bytes per layer (16-bit, dropout on), less
    # the 5as/h attention-score term that fused attention never stores; + the 4as log-sum-exp
    cfg = dataclasses.replace(model_preset("gpt2-small"), dropout=0.1)
    s, h, a = 1024, cfg.d_model, cfg.n_head
    assert layer_activation_bytes(cfg, s, "none", residual=2) == 34 * s * h + 4 * a * s
    assert layer_activation_bytes(cfg, s, "full", residual=2) == 2 * s * h


@pytest.mark.parametrize("name", ["gpt2-small", "llama-tiny", "palm-tiny", "neox"])
def test_none_matches_what_autograd_saves_for_one_block(name):
    # an independent count: every distinct storage autograd keeps for the backward pass of one
    # block under bf16 autocast (weights excluded: only tensors with the sequence dimension)
    s = 96  # a length no weight has
    # palm-tiny: the parallel block with one shared norm; neox: with a norm per branch
    base = (dataclasses.replace(model_preset("llama-tiny"), norm="layernorm", bias=True, mlp="gelu",
                                parallel_block=True, rope_fraction=0.25)
            if name == "neox" else model_preset(name))
    cfg = dataclasses.replace(base, d_model=128, n_head=4, n_kv_heads=None,
                              d_ff=352 if name in ("llama-tiny", "palm-tiny") else None, vocab_size=100,
                              dropout=0.0)
    # with the fast paths, as a CPU run has them (on a GPU torch.compile fuses the same pieces)
    block = apply_fast_paths(Block(cfg, 0, causal=True)).train()
    x = torch.randn(1, s, cfg.d_model, requires_grad=True)
    kwargs = {"rotary": Rotary(cfg.rotary_dim, 256, 10000.0)} if cfg.position == "rope" else {}
    storages = {}

    def pack(t):
        if s in t.shape:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, **kwargs)
    measured = sum(storages.values())
    estimate = layer_activation_bytes(cfg, s, "none")
    # the estimate leaves out the norms' per-token statistics and the rotary tables
    assert 0.9 * measured <= estimate <= measured, (measured, estimate)


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80") == parse_memory("80 gb") == 80e9
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("40000MB") == 40e9
    assert parse_memory("1.5TB") == 1.5e12
    for bad in ("lots", "80XB", "", "-1GB", "0", "GB80", "8 0GB"):
        with pytest.raises(ConfigError, match="--device-memory"):
            parse_memory(bad)


def test_bad_plan_options_are_one_line_errors():
    for args, needle in ((["--device-memory", "eighty"], "--device-memory 'eighty'"),
                         (["--devices", "0"], "--devices: 0: expected a positive integer"),
                         (["--seq-len", "100000"], "--seq-len 100000")):
        out = subprocess.run([sys.executable, "-m", "pretrainer", "info", "gpt2-small", "--plan", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        err = out.stderr.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert needle in err, err
    helped = subprocess.run([sys.executable, "-m", "pretrainer", "info", "--help"], capture_output=True,
                            text=True, timeout=120).stdout
    assert all(opt in helped for opt in ("--plan", "--devices", "--device-memory", "--micro-batch",
                                          "--activation-checkpointing"))
