"""ELECTRA (Clark et al. 2020): the discriminator's published size, the generator the paper
describes, replaced-token detection's labels on a worked example, the loss, training through the
one loop (exact resume, checkpoints that hold both models, the CLI), fine-tuning the
discriminator, and parity with Hugging Face ``ElectraForPreTraining`` / ``ElectraModel`` /
``ElectraForMaskedLM`` both ways, built locally from random weights with every parameter
perturbed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrainer.config import ElectraConfig, RunConfig, TrainConfig, load_config, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.model import EncoderLM, build_model
from pretrainer.model.electra import ElectraPretraining, generator_config
from pretrainer.model.info import model_info
from pretrainer.train.objectives import OBJECTIVES
from pretrainer.train.trainer import resume_config, train
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 300
IGNORE = -100
TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, d_ff=64, d_embed=16, max_seq_len=64)


def _inputs(batch: int = 2, length: int = 20, seed: int = 1):
    """ids, two segments (0 then 1), and padding after position 15 of the second row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return ids, types, mask


def _electra(**electra):
    """The objective and a freshly built discriminator + generator of the tiny config."""
    torch.manual_seed(0)
    disc = build_model("electra-tiny", **TINY)
    cfg = RunConfig(model=disc.cfg, objective="electra", electra=ElectraConfig(**electra))
    objective = OBJECTIVES["electra"](cfg)
    return objective, objective.wrap(disc)


# ----------------------------------------------------------------------------------------------
# Sizes


def test_electra_small_has_electramodels_parameter_count_and_the_papers_generator():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.ElectraModel(transformers.ElectraConfig(
            vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12,
            num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512, type_vocab_size=2))
    expected = sum(p.numel() for p in hf.parameters())
    assert expected == 13_483_008  # google/electra-small-discriminator
    cfg = model_preset("electra-small")
    info = model_info(cfg)
    assert info["params"] == expected
    assert info["params_rtd_head"] == 256 * 256 + 256 + 256 + 1  # dense + one logit per token
    # Clark et al. 2020, Table 6: ELECTRA-Small's generator is a quarter of hidden, FFN and heads
    gen = generator_config(cfg, ElectraConfig())
    assert (gen.d_model, gen.n_head, gen.ff_dim, gen.n_layer, gen.embed_dim) == (64, 1, 256, 12, 128)
    assert not gen.rtd_head and gen.mlm_head and not gen.pooler


def test_generator_shares_the_embeddings_and_the_checkpoint_stores_them_once():
    objective, pair = _electra()
    d, g = pair.discriminator, pair.generator
    for name in ("tok_emb", "pos_emb", "type_emb", "embed_norm"):
        assert getattr(g, name) is getattr(d, name)
    assert g.mlm.out.weight is d.tok_emb.weight and g.embed_proj is not d.embed_proj
    assert d.mlm is None and d.rtd is not None
    # every shared tensor once, under the discriminator's name; each parameter once in the optimizer
    from pretrainer.train.checkpoint import model_tensors

    stored = model_tensors(pair)
    assert not any(k.startswith("generator.") and k.split(".")[1] in ("tok_emb", "pos_emb", "type_emb", "embed_norm")
                   for k in stored) and "generator.mlm.out.weight" not in stored
    assert sum(t.numel() for t in stored.values()) == sum(p.numel() for p in pair.parameters())


# ----------------------------------------------------------------------------------------------
# The worked behaviour


def _generator_says(pair, probs: dict[int, float]) -> None:
    """Make the generator's softmax exactly ``probs`` (token -> probability) at every position:
    its head's norm outputs zeros, so the logits are the output bias."""
    with torch.no_grad():
        pair.generator.mlm.norm.weight.zero_()
        pair.generator.mlm.norm.bias.zero_()
        bias = pair.generator.mlm.out.bias
        bias.fill_(-1e4)
        for token, p in probs.items():
            bias[token] = torch.tensor(p).log()


def test_samples_are_the_inverse_cdf_of_the_generators_softmax_at_the_batchs_uniforms():
    objective, pair = _electra()
    _generator_says(pair, {9: 0.5, 10: 0.3, 11: 0.2})
    x = torch.tensor([[4, 8, 8, 8, 8, 5]])
    labels = torch.tensor([[IGNORE, 12, 12, 12, 12, IGNORE]])
    u = torch.tensor([[0.99, 0.1, 0.55, 0.79, 0.95, 0.0]])  # cumulative: 9 up to 0.5, 10 to 0.8, 11 to 1
    _, _, corrupted, _ = objective.corrupt(pair, {"input_ids": x, "labels": labels, "uniform": u})
    assert corrupted.tolist() == [[4, 9, 10, 10, 11, 5]]


def test_labels_are_1_exactly_where_the_sample_differs_from_the_original():
    """A generator that always samples token 9: at the selected positions whose original is 9 the
    discriminator's label is 0 (a sampled original counts as real), at the others 1; every position
    outside the selection keeps its token and label 0."""
    objective, pair = _electra()
    _generator_says(pair, {9: 1.0})
    x = torch.tensor([[4, 9, 11, 6, 9, 12, 6, 5],
                      [4, 13, 6, 9, 14, 6, 15, 5]])
    labels = torch.full_like(x, IGNORE)
    # selected: row 0 positions 1 (kept as is, original 9), 3 (<mask>, original 9), 6 (<mask>, original 7);
    # row 1 positions 2 (<mask>, original 9), 5 (<mask>, original 8)
    labels[0, 1], labels[0, 3], labels[0, 6] = 9, 9, 7
    labels[1, 2], labels[1, 5] = 9, 8
    logits, y, corrupted, replaced = objective.corrupt(pair, {"input_ids": x, "labels": labels})
    assert y.tolist() == [9, 9, 7, 9, 8]
    expected_input = x.clone()
    expected_input[labels != IGNORE] = 9
    assert torch.equal(corrupted, expected_input)
    assert replaced.int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 0],
                                       [0, 0, 0, 0, 0, 1, 0, 0]]
    # with a generator that samples freely, the labels are still exactly "differs from the original"
    objective, pair = _electra()
    x = torch.randint(7, V, (4, 30), generator=torch.Generator().manual_seed(3))
    labels = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.5, x, IGNORE)
    batch = {"input_ids": x.masked_fill(labels != IGNORE, 6), "labels": labels,
             "uniform": torch.rand(x.shape, generator=torch.Generator().manual_seed(0))}
    _, _, corrupted, replaced = objective.corrupt(pair, batch)
    assert bool(replaced.any()) and bool((~replaced & (labels != IGNORE)).any())  # both kinds occur
    assert torch.equal(replaced, corrupted != x)
    assert torch.equal(corrupted[labels == IGNORE], x[labels == IGNORE])


def test_loss_is_generator_mlm_plus_lambda_times_bce_over_every_counted_token():
    objective, pair = _electra(disc_weight=50.0)
    ids, types, mask = _inputs()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.15, ids, IGNORE)
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids.masked_fill(labels != IGNORE, 6), "labels": labels, "attention_mask": mask,
             "uniform": torch.rand(ids.shape, generator=torch.Generator().manual_seed(6))}
    loss = objective.loss(pair, batch)
    gen_logits, y, corrupted, replaced = objective.corrupt(pair, batch)
    d = pair.discriminator
    rtd = d(corrupted, attention_mask=mask).logits  # [B, T]: one logit per token
    real = mask.bool()
    assert rtd.shape == ids.shape
    by_hand = F.cross_entropy(gen_logits, y) + 50.0 * F.binary_cross_entropy_with_logits(
        rtd[real], replaced[real].float())
    torch.testing.assert_close(loss, by_hand)
    # the sample takes no gradient; the generator learns from its MLM loss, the shared embedding from both
    loss.backward()
    assert pair.generator.blocks[0].attn.qkv.weight.grad is not None
    assert d.rtd.out.weight.grad is not None and d.tok_emb.weight.grad is not None


def test_electra_data_masks_85_percent_and_keeps_15_percent_without_random_tokens(synthetic_data):
    from pretrainer.data.tokens import TokenSplit

    cfg = RunConfig(model=model_preset("electra-tiny"), objective="electra")
    objective = OBJECTIVES["electra"](dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=V)))
    builder = objective.builder(TokenSplit(synthetic_data, "train"), 64, 0)
    xs, ys, us = builder.batch(0, 64)
    again = objective.as_batch(builder.batch(3, 2))  # a pure function of the sample index
    assert torch.equal(again["uniform"], us[3:5]) and torch.equal(again["input_ids"], xs[3:5])
    assert us.shape == xs.shape and 0.4 < us.mean().item() < 0.6
    selected = ys != IGNORE
    masked = selected & (xs == 6)  # the synthetic data's <mask>
    kept = selected & (xs == ys)
    assert bool((masked | kept)[selected].all())  # never a random token
    share = masked.sum().item() / selected.sum().item()
    assert 0.80 < share < 0.90, share
    assert 0.12 < selected.float().mean().item() < 0.18


def test_objective_and_model_must_agree():
    disc = model_preset("electra-tiny")
    disc.vocab_size = V
    with pytest.raises(ConfigError, match="needs model.rtd_head=true"):
        RunConfig(model=model_preset("bert-tiny"), objective="electra").validate(need_paths=False)
    with pytest.raises(ConfigError, match="rtd_head=true .* trains with objective=electra only"):
        RunConfig(model=disc, objective="mlm").validate(need_paths=False)
    with pytest.raises(ConfigError, match="electra.generator_heads=0.5: 2 heads do not divide"):
        RunConfig(model=dataclasses.replace(disc, n_head=4, d_model=132), objective="electra",
                  electra=ElectraConfig(generator_heads=0.5, generator_hidden=0.25)).validate(need_paths=False)
    with pytest.raises(ConfigError, match="electra.disc_weight=0"):
        load_config(None, ["model=electra-tiny", "objective=electra", "electra.disc_weight=0"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="rtd_head=true .* applies to arch=encoder only"):
        dataclasses.replace(model_preset("gpt-nano"), rtd_head=True).validate()


# ----------------------------------------------------------------------------------------------
# Training through the one loop


def _electra_cfg(data, out, **train_kw) -> RunConfig:
    model = model_preset("electra-tiny")
    model.n_layer, model.d_model, model.n_head, model.d_ff, model.d_embed, model.vocab_size = 2, 32, 2, 64, 16, V
    model.dropout = 0.1  # so that exact resume also needs the RNG state
    kw = dict(max_steps=16, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=8,
              eval_batches=2, log_every=4, checkpoint_every=6, plot=False)
    kw.update(train_kw)
    return RunConfig(model=model, data=str(data), out=str(out), objective="electra", train=TrainConfig(**kw))


def _logged(run: Path, key: str) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_electra_resume_is_bit_exact(synthetic_data, tmp_path):
    # stopped at step 6, inside a logging window (log_every=4): the window's discriminator counts
    # travel in the checkpoint too
    train(_electra_cfg(synthetic_data, tmp_path / "full"), quiet=True)
    train(_electra_cfg(synthetic_data, tmp_path / "part"), stop_at=6, quiet=True)
    train(resume_config(tmp_path / "part"), resume=True, quiet=True)
    for key in ("loss", "disc_accuracy", "replaced", "val_loss", "val_disc_accuracy", "val_replaced",
                "val_accuracy", "val_gen_loss"):
        a, b = _logged(tmp_path / "full", key), _logged(tmp_path / "part", key)
        assert a == b and len(a) >= 2, key
    replaced = _logged(tmp_path / "full", "val_replaced")
    assert all(0.0 < r < 0.15 for r in replaced.values())  # at most the 15 % selected
    # the checkpoint holds both models; the run loads as its discriminator
    import pretrainer
    from safetensors.torch import load_file
    from pretrainer.train.checkpoint import latest_checkpoint

    keys = load_file(str(latest_checkpoint(tmp_path / "full")[0] / "model.safetensors")).keys()
    assert any(k.startswith("generator.blocks.") for k in keys) and "discriminator.rtd.out.weight" in keys
    disc = pretrainer.load(tmp_path / "full")
    assert isinstance(disc, EncoderLM) and disc.rtd is not None and disc.cfg.d_model == 32
    pair = pretrainer.load(tmp_path / "full", trained=True)
    assert isinstance(pair, ElectraPretraining) and pair.generator.cfg.d_model == 8


def test_cli_pretrains_exports_and_fine_tunes_electra_tiny(synthetic_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrainer", "pretrain", "model=electra-tiny", "objective=electra",
           f"data={synthetic_data}", f"out={run}", "model.n_layer=2", "train.max_steps=12",
           "train.batch_size=8", "train.seq_len=32", "train.lr=3e-3", "train.warmup_steps=2",
           "train.log_every=4", "train.eval_every=12", "train.eval_batches=2", "train.plot=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0.0 <= _logged(run, "val_disc_accuracy")[12] <= 1.0
    done = subprocess.run([sys.executable, "-m", "pretrainer", "evaluate", str(run), "--max-batches", "2",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout)
    assert scores["val_disc_accuracy"] == _logged(run, "val_disc_accuracy")[12]  # same windows and samples
    # the discriminator exports as ElectraForPreTraining, the generator as ElectraForMaskedLM
    import pretrainer

    for flag, cls, which in (([], transformers.ElectraForPreTraining, "discriminator"),
                             (["--generator"], transformers.ElectraForMaskedLM, "generator")):
        out = tmp_path / f"hf-{which}"
        done = subprocess.run([sys.executable, "-m", "pretrainer", "export", str(run), "--out", str(out), *flag],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        hf, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        ours = getattr(pretrainer.load(run, trained=True), which)
        ids, types, mask = _inputs()
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, token_type_ids=types, attention_mask=mask).logits,
                                       hf.eval()(ids, token_type_ids=types, attention_mask=mask).logits, **TOL)
    # the discriminator fine-tunes like any encoder, from the run and from the exported folder
    from test_finetune import sentiment_tsv
    from pretrainer.finetune import finetune

    train_file, dev = sentiment_tsv(tmp_path / "train.tsv", 48, 0), sentiment_tsv(tmp_path / "dev.tsv", 16, 1)
    for source in (run, tmp_path / "hf-discriminator"):
        r = finetune(str(source), "classification", str(train_file), str(tmp_path / f"ft-{source.name}"),
                     eval=str(dev), epochs=1, batch_size=8, max_len=32, quiet=True)
        assert 0.0 <= r["accuracy"] <= 1.0


# ----------------------------------------------------------------------------------------------
# Hugging Face parity


def _hf(cls_name: str, seed: int = 1, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.ElectraConfig(**{**dict(vocab_size=V, embedding_size=16, hidden_size=32,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=64), **kw})
    torch.manual_seed(seed)
    return _perturb(getattr(transformers, cls_name)(config), seed)


def _same_logits(ours, hf, field: str = "logits", theirs: str = "logits") -> None:
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = getattr(ours(ids, token_type_ids=types, attention_mask=mask), field)
        b = getattr(hf(ids, token_type_ids=types, attention_mask=mask), theirs)
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_import_electra_for_pretraining_gives_same_logits(tmp_path, act):
    from pretrainer.interop.hf import import_hf

    hf = _hf("ElectraForPreTraining", hidden_act=act)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.rtd_head and ours.cfg.d_embed == 16 and ours.pooler is None
    _same_logits(ours, hf)


@pytest.mark.parametrize("d_embed", [16, None])
def test_export_loads_in_electra_for_pretraining_and_electra_model(tmp_path, d_embed):
    transformers = pytest.importorskip("transformers")
    from pretrainer.interop.hf import export_hf

    ours = _perturb(build_model("electra-tiny", **{**TINY, "d_embed": d_embed}))
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "electra" and config["architectures"] == ["ElectraForPreTraining"]
    assert config["embedding_size"] == (d_embed or 32)
    hf, info = transformers.ElectraForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same_logits(ours, hf.eval())
    base, info = transformers.ElectraModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    _same_logits(ours, base.eval(), "hidden_states", "last_hidden_state")


def test_bare_electra_model_imports_as_discriminator_with_a_fresh_head(tmp_path):
    from pretrainer.interop.hf import import_hf

    hf = _hf("ElectraModel")
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.cfg.rtd_head
    _same_logits(ours, hf, "hidden_states", "last_hidden_state")
    again = import_hf(tmp_path)  # the head is drawn from a fixed seed: the same at every import
    assert torch.equal(again.rtd.dense.weight, ours.rtd.dense.weight)


def test_generator_round_trips_as_electra_for_masked_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pretrainer.interop.hf import export_hf, import_hf

    # a generator: narrower than its embeddings (32 wide embeddings, 16 hidden), one head
    hf = _hf("ElectraForMaskedLM", embedding_size=32, hidden_size=16, num_attention_heads=1)
    hf.save_pretrained(tmp_path / "in")
    ours = import_hf(tmp_path / "in")
    assert not ours.cfg.rtd_head and ours.cfg.d_embed == 32 and ours.cfg.d_model == 16
    _same_logits(ours, hf)
    export_hf(ours, tmp_path / "out")
    back, info = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same_logits(ours, back.eval())


def test_electra_fields_and_options_without_equivalent_are_refused(tmp_path):
    from pretrainer.interop.hf import config_from_hf, hf_family

    base = _hf("ElectraForPreTraining").config.to_dict()
    for field, value in (("position_embedding_type", "relative_key"), ("is_decoder", True),
                         ("tie_word_embeddings", False)):
        with pytest.raises(PretrainerError, match=f"config.json: {field}={value!r} has no pretrainer equivalent"):
            config_from_hf({**base, field: value})
    with pytest.raises(PretrainerError, match="hidden_act='relu' has no pretrainer equivalent"):
        config_from_hf({**base, "architectures": ["ElectraForMaskedLM"], "hidden_act": "relu"})
    disc = model_preset("electra-tiny")
    disc.vocab_size = V
    for field, value in (("pooler", True), ("prenorm", True), ("type_vocab_size", 0)):
        with pytest.raises(PretrainerError, match=f"model.{field}={value!r} has no Hugging Face equivalent"):
            hf_family(dataclasses.replace(disc, **{field: value}))
    with pytest.raises(PretrainerError, match="model.mlp='relu' has no Hugging Face equivalent"):
        hf_family(dataclasses.replace(disc, rtd_head=False, mlp="relu"))  # a generator's head is gelu
