"""Mixture-of-experts MLPs (``model.moe``): routing, capacity, the auxiliary losses on hand-computed
examples, parameter counts against ``transformers``, Mixtral logit parity both ways, and training
(one process, and two processes under FSDP2 and DDP)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from pretrainer.config import ModelConfig, MoEConfig, load_config, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.model import build_model
from pretrainer.model.info import model_info
from pretrainer.model.layers import MoE, moe_aux_loss, moe_layers, router_stats

V, T = 300, 64


def _moe(d: int = 2, **moe) -> MoE:
    """An MoE layer of width ``d`` whose experts are small ReLU MLPs with positive weights (a tiny
    ReLU expert drawn at random can output zeros for a one-hot token, hiding what a test checks)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d, d_ff=4, n_head=1, mlp="relu", bias=False, moe=MoEConfig(**moe))
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.uniform_(0.1, 1.0)
    return layer


def _route(layer: MoE, preferred: list[int], second: list[int] | None = None) -> torch.Tensor:
    """Tokens (one-hot rows over the experts) that make the router prefer ``preferred[i]`` for
    token i (score ln 3 against 0; with ``second``, ln 2 for that expert)."""
    d, E = layer.router.in_features, layer.n_experts
    assert d == E
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    x = torch.zeros(len(preferred), d)
    for i, e in enumerate(preferred):
        x[i, e] = math.log(3.0)
        if second is not None:
            x[i, second[i]] = math.log(2.0)
    return x


# ----------------------------------------------------------------------------------------------
# The router's losses, by hand


def test_load_balancing_loss_is_switch_formula_on_a_hand_computed_example():
    """Fedus et al. (2021) eq. 4: n_experts * sum_i f_i P_i. Three tokens score (ln 3, 0) and one
    (0, ln 3): probabilities (3/4, 1/4) and (1/4, 3/4); f = (3/4, 1/4), P = (5/8, 3/8), so the loss
    is 2 (3/4 5/8 + 1/4 3/8) = 9/8. Each token's logsumexp is ln 4: the z-loss is (ln 4)^2."""
    layer = _moe(n_experts=2, top_k=1, aux_loss_weight=1.0, z_loss_weight=0.0).eval()
    layer(_route(layer, [0, 0, 0, 1]))
    assert layer.aux_loss.item() == pytest.approx(9 / 8, rel=1e-6)
    layer = _moe(n_experts=2, top_k=1, aux_loss_weight=0.0, z_loss_weight=1.0).eval()
    layer(_route(layer, [0, 0, 0, 1]))
    assert layer.aux_loss.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    # perfectly balanced routing with uniform probabilities gives 1
    layer = _moe(n_experts=2, top_k=1, aux_loss_weight=1.0).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(6, 2))
    assert layer.aux_loss.item() == pytest.approx(1.0)


def test_outputs_are_the_chosen_experts_weighted_by_the_router():
    """Top-1 (Switch): the expert's output times its probability; top-2 (Mixtral): both chosen
    experts, their probabilities renormalised to sum to 1."""
    layer = _moe(n_experts=2, top_k=1).eval()
    x = _route(layer, [0, 1])
    y = layer(x)
    torch.testing.assert_close(y[0], 0.75 * layer.experts[0](x[:1])[0])
    torch.testing.assert_close(y[1], 0.75 * layer.experts[1](x[1:])[0])
    layer = _moe(d=3, n_experts=3, top_k=2).eval()
    x = _route(layer, [0, 2], second=[1, 0])
    p = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    y = layer(x)
    w = p[0, [0, 1]] / p[0, [0, 1]].sum()
    torch.testing.assert_close(y[0], w[0] * layer.experts[0](x[:1])[0] + w[1] * layer.experts[1](x[:1])[0])


def test_tokens_over_capacity_are_dropped_and_counted():
    """Capacity ceil(1.0 * 8 tokens / 2 experts) = 4: six tokens prefer expert 0, the last two of
    them get no expert (zero from the layer, so the block's residual carries them unchanged);
    evaluation routes every token."""
    layer = _moe(n_experts=2, top_k=1, capacity_factor=1.0).train()
    x = _route(layer, [0, 0, 0, 0, 0, 0, 1, 1])
    y = layer(x)
    assert torch.equal(y[4:6], torch.zeros(2, 2))
    assert y[:4].abs().sum() > 0 and y[6:].abs().sum() > 0
    stats = router_stats(layer)
    assert stats["moe_dropped"] == pytest.approx(2 / 8)
    assert stats["moe_load_max"] == pytest.approx(6 / 4)  # assignments 6 and 2, mean 4
    assert stats["moe_load"] == [0.75, 0.25]
    assert router_stats(layer) is None  # read and reset
    assert layer.eval()(x)[4:6].abs().sum() > 0


def test_first_choices_come_before_second_choices():
    """GShard's priority: with top-2 and room for 2 tokens per expert, tokens 2 and 3 keep their
    first choice (expert 0) even though tokens 0 and 1 reached expert 0 earlier as a second choice."""
    layer = _moe(n_experts=2, top_k=2, capacity_factor=0.5).train()
    x = _route(layer, [1, 1, 0, 0], second=[0, 0, 1, 1])
    _, expert = torch.softmax(layer.router(x), -1).topk(2, dim=-1)
    keep = layer.within_capacity(expert)
    assert keep[:, 0].all() and not keep[:, 1].any()


def test_gradients_reach_the_router_and_every_expert_under_a_loss():
    torch.manual_seed(0)
    model = build_model("mixtral-tiny", n_layer=2, d_model=32, n_head=4, d_ff=48, vocab_size=V,
                        max_seq_len=T, moe=dict(n_experts=4, top_k=1)).train()
    ids = torch.randint(0, V, (2, 16))
    loss = model(ids).logits.logsumexp(-1).mean() + moe_aux_loss(moe_layers(model))
    loss.backward()
    for block in model.blocks:
        assert block.mlp.router.weight.grad.abs().sum() > 0
        for expert in block.mlp.experts:  # every expert is part of the graph, chosen or not
            assert expert.up.weight.grad is not None


def test_cached_generation_equals_recomputation():
    torch.manual_seed(0)
    model = build_model("mixtral-tiny", n_layer=2, d_model=32, n_head=4, d_ff=48, vocab_size=V,
                        max_seq_len=T).eval()
    prompt = torch.randint(0, V, (2, 7))
    a = model.generate(prompt, 12, use_cache=True)
    b = model.generate(prompt, 12, use_cache=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Configuration and counts


@pytest.mark.parametrize("override, message", [
    ("model.moe.top_k=3", "top_k=3: expected at most n_experts=2"),
    ("model.moe.capacity_factor=.inf", "capacity_factor=inf: expected a finite number >= 0"),
    ("model.moe.aux_loss_weight=-1", "aux_loss_weight=-1.0"),
    ("model.moe.n_experts=-2", "n_experts=-2"),
    ("model.moe.top_k=0", "top_k=0: expected a positive integer"),
    ("model.moe.n_expert=2", "did you mean 'model.moe.n_experts'"),
])
def test_bad_moe_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = load_config(None, ["model=llama-tiny", "model.moe.n_experts=2", override])
        cfg.model.validate()


def test_a_preset_copy_does_not_share_its_expert_settings():
    a = model_preset("mixtral-tiny")
    b = build_model("mixtral-tiny", vocab_size=V, device="meta", moe=dict(n_experts=2)).cfg
    assert a.moe.n_experts == 8 and b.moe.n_experts == 2 and model_preset("mixtral-tiny").moe.n_experts == 8


def test_moe_layers_are_placed_as_switch_places_them():
    cfg = model_preset("switch-base-8")
    assert [i for i in range(12) if cfg.moe.is_moe_layer(i)] == [1, 5, 9]
    assert all(model_preset("mixtral-8x7b").moe.is_moe_layer(i) for i in range(32))


transformers = pytest.importorskip("transformers")


def _hf_count(model_cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


def test_counts_equal_transformers_and_the_published_ones():
    """Mixtral 8x7B: 46,702,792,704 parameters, 12,879,925,248 active with 2 of 8 experts (Jiang et
    al. 2024 give 47B / 13B); switch-base-8 as transformers' SwitchTransformersConfig defaults."""
    from transformers import (MixtralConfig, MixtralForCausalLM, SwitchTransformersConfig,
                              SwitchTransformersForConditionalGeneration)

    mixtral = model_info(model_preset("mixtral-8x7b"))
    hf = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                       num_experts_per_tok=2)
    assert mixtral["params"] == _hf_count(MixtralForCausalLM, hf) == 46_702_792_704
    assert mixtral["params_active"] == 12_879_925_248
    # active = total less the 6 idle experts of each of 32 layers (3 matrices of 4096 x 14336 each)
    assert mixtral["params"] - mixtral["params_active"] == 32 * 6 * 3 * 4096 * 14336
    switch = model_info(model_preset("switch-base-8"))
    assert switch["params"] == _hf_count(SwitchTransformersForConditionalGeneration,
                                         SwitchTransformersConfig()) == 317_312_256
    # FLOPs per token come from the active parameters: a dense twin with top_k experts' worth
    tiny = model_info(dataclasses.replace(model_preset("mixtral-tiny"), vocab_size=V), 128)
    assert tiny["params_active"] < tiny["params"]
    assert tiny["params_non_embedding"] == tiny["params_active"] - 2 * 256 * V


# ----------------------------------------------------------------------------------------------
# Mixtral parity, both directions


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ids():
    return torch.randint(3, V, (2, 40), generator=torch.Generator().manual_seed(1))


def test_mixtral_hf_to_ours(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf = _perturb(MixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=T,
        rms_norm_eps=1e-5, attn_implementation="eager")))
    hf.save_pretrained(tmp_path)
    from pretrainer.interop.hf import import_hf

    ours = import_hf(tmp_path)
    assert (ours.cfg.moe.n_experts, ours.cfg.moe.top_k, ours.cfg.moe.capacity_factor) == (4, 2, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, hf(_ids()).logits, atol=1e-5, rtol=1e-5)
        hf_greedy = hf.generate(_ids()[:1, :10], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(_ids()[:1, :10], 8), hf_greedy)


def test_mixtral_ours_to_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrainer.interop.hf import export_hf

    ours = _perturb(build_model("mixtral-tiny", n_layer=2, d_model=64, n_head=4, d_ff=48, vocab_size=V,
                                max_seq_len=T, moe=dict(n_experts=4, top_k=2, capacity_factor=1.0)))
    export_hf(ours, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, hf.eval()(_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(top_k=1), "moe.top_k=1 has no Hugging Face equivalent"),
    (dict(every=2), "moe.every=2"),
])
def test_export_refuses_what_mixtral_cannot_hold(tmp_path, overrides, message):
    from pretrainer.interop.hf import export_hf

    ours = build_model("mixtral-tiny", n_layer=2, d_model=32, d_ff=48, vocab_size=V, moe=overrides)
    with pytest.raises(PretrainerError, match=message):
        export_hf(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    gpt = build_model("gpt-nano", vocab_size=V, moe=dict(n_experts=2))
    with pytest.raises(PretrainerError, match="experts convert as Mixtral only"):
        export_hf(gpt, tmp_path / "gpt")


def test_mixtral_import_refuses_router_noise(tmp_path):
    from transformers import MixtralConfig

    from pretrainer.interop.hf import config_from_hf

    raw = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1).to_dict()
    with pytest.raises(PretrainerError, match="router_jitter_noise=0.1 has no pretrainer equivalent"):
        config_from_hf(raw, "x/config.json")


# ----------------------------------------------------------------------------------------------
# Training


def test_pretraining_logs_router_statistics(synthetic_data, tmp_path):
    from pretrainer.train.trainer import train

    out = tmp_path / "run"
    cfg = load_config(None, ["model=mixtral-tiny", "model.n_layer=2", "model.d_model=64", "model.d_ff=96",
                             "model.moe.n_experts=4", f"data={synthetic_data}", f"out={out}",
                             "train.max_steps=4", "train.seq_len=32", "train.batch_size=4", "train.log_every=2",
                             "train.eval_every=0", "train.eval_batches=1", "train.plot=false"])
    train(cfg, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert r["moe_load_max"] >= 1.0 and 0.0 <= r["moe_dropped"] < 1.0
        assert r["moe_aux_loss"] == pytest.approx(0.01 * 2, rel=0.5)  # two layers near balance
        assert math.isfinite(r["loss"])


def test_fsdp_and_ddp_train_experts_as_one_process(synthetic_data, tmp_path):
    """Dropless routing without the batch-level balance loss is the same computation per token,
    so two FSDP2 processes log one process's losses; DDP with a capacity limit (every expert
    always in the graph) trains and logs the router statistics."""
    from test_parallel import COMMON, close, logged as logged_values, one_process, torchrun

    model = ["model=mixtral-tiny", "model.n_layer=2", "model.d_model=64", "model.d_ff=96",
             "model.moe.n_experts=4"]
    dropless = model + ["model.moe.capacity_factor=0", "model.moe.aux_loss_weight=0"]

    def run(out, batch, extra=()):
        return COMMON + [f"data={synthetic_data}", f"out={out}", f"train.batch_size={batch}", *extra]

    torchrun([{"overrides": run(tmp_path / "fsdp", 4, dropless + ["train.parallel=fsdp"])},
              {"overrides": run(tmp_path / "ddp", 4, model + ["train.parallel=ddp"])}], tmp_path)
    one_process(run(tmp_path / "one", 8, dropless))
    close(logged_values(tmp_path / "one"), logged_values(tmp_path / "fsdp"), range(1, 7))
    close(logged_values(tmp_path / "one", "val_loss"), logged_values(tmp_path / "fsdp", "val_loss"), [0, 3, 6])
    assert set(logged_values(tmp_path / "ddp", "moe_dropped")) == set(range(1, 7))
