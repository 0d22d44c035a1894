"""Images, the Vision Transformer and masked-autoencoder pretraining (issue 18).

References: the published ViT-B/16 parameter count and Hugging Face's ViTModel built from its config;
logits of ``ViTForImageClassification`` and encoder states of ``ViTMAEForPreTraining`` (the same mask
through its ``noise``) from random weights, both ways; ViTMAE's own patchify; hand-built examples for
the mask and the loss.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest
import torch

from pretrainer.config import load_config, model_preset
from pretrainer.data.images import ImageBatches, ImageSplit, prepare_images
from pretrainer.errors import ConfigError, DataError
from pretrainer.model import build_model
from pretrainer.model.info import model_info
from pretrainer.model.vit import (MAEPretraining, masked_patch_loss, patchify, random_masking, unpatchify)
from pretrainer.config import MAEConfig
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_images("builtin:digits", out, progress=False)
    return out


def _png(path, size=(8, 8), mode="L", value=0):
    Image = pytest.importorskip("PIL.Image")

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


# ----------------------------------------------------------------------------------------------
# Images as data


def test_builtin_digits(digits):
    m = json.loads((digits / "manifest.json").read_text())
    assert m["format"] == "pretrainer-images" and m["image_size"] == [8, 8] and m["channels"] == 1
    assert m["classes"] == [str(i) for i in range(10)]
    s = m["splits"]
    assert s["train"]["count"] + s["val"]["count"] == 1797 and s["val"]["count"] == 180
    from sklearn.datasets import load_digits

    ref = load_digits()
    train = ImageSplit(digits, "train")
    assert train.images.shape == (1617, 1, 8, 8) and train.images.dtype == np.uint8
    # every stored image is one of sklearn's, scaled 0-16 -> 0-255, with its label
    lookup = {np.rint(img * 255 / 16).astype(np.uint8).tobytes(): int(t) for img, t in zip(ref.images, ref.target)}
    for i in range(0, 1617, 97):
        assert lookup[train.images[i, 0].tobytes()] == int(train.labels[i])


def test_folder_of_images(tmp_path):
    for c, value in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(tmp_path / "src" / c / f"{i}.png", value=value + i)
    _png(tmp_path / "src" / "dog" / "x.jpg", mode="L", value=210)
    m = prepare_images(str(tmp_path / "src"), tmp_path / "out", val_fraction=0.25, progress=False)
    assert m["classes"] == ["cat", "dog"] and m["channels"] == 1 and m["image_size"] == [8, 8]
    both = [ImageSplit(tmp_path / "out", s) for s in ("train", "val")]
    labels = sorted(int(v) for s in both for v in s.labels)
    assert labels == [0, 0, 0, 1, 1, 1, 1] and both[1].count == 2
    cats = [s.images[j, 0, 0, 0] for s in both for j in range(s.count) if s.labels[j] == 0]
    assert sorted(cats) == [10, 11, 12]
    # an RGB image makes the folder RGB; mixed sizes are resized with --image-size
    _png(tmp_path / "src" / "cat" / "big.png", size=(16, 16), mode="RGB", value=(1, 2, 3))
    m = prepare_images(str(tmp_path / "src"), tmp_path / "out", image_size=4, progress=False)
    assert m["channels"] == 3 and m["image_size"] == [4, 4]


def test_bad_images_name_the_file(tmp_path):
    _png(tmp_path / "a" / "x" / "0.png")
    _png(tmp_path / "a" / "x" / "1.png", size=(9, 9))
    with pytest.raises(DataError, match=r"1\.png: 9 x 9 pixels.*--image-size"):
        prepare_images(str(tmp_path / "a"), tmp_path / "o1", progress=False)
    (tmp_path / "b" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        prepare_images(str(tmp_path / "b"), tmp_path / "o2", progress=False)
    _png(tmp_path / "c" / "loose.png")
    with pytest.raises(DataError, match=r"loose\.png: an image without a label"):
        prepare_images(str(tmp_path / "c"), tmp_path / "o3", progress=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no labelled images"):
        prepare_images(str(tmp_path / "d"), tmp_path / "o4", progress=False)


def test_prepare_cli(tmp_path, capsys):
    from pretrainer.cli import main

    _png(tmp_path / "c" / "loose.png")
    assert main(["prepare", "--images", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "loose.png" in err
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "--corpus and --tokenizer are required (or --images DIR" in capsys.readouterr().err
    _png(tmp_path / "d" / "a" / "0.png")
    _png(tmp_path / "d" / "b" / "0.png")
    assert main(["prepare", "--images", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--val-fraction", "0.5"]) in (0, None)
    assert "1 train / 1 val images of 1 x 8 x 8, 2 classes" in capsys.readouterr().out


def test_batches_are_a_pure_function_of_the_sample(digits):
    b = ImageBatches(ImageSplit(digits, "train"), seed=3, noise_patches=16)
    whole = b.batch(1610, 12)  # crosses an epoch boundary (1,617 images)
    again = ImageBatches(ImageSplit(digits, "train"), seed=3, noise_patches=16).batch(1615, 7)
    for k in whole:
        assert torch.equal(whole[k][5:], again[k])


# ----------------------------------------------------------------------------------------------
# ViT


def test_vit_base_parameter_count():
    # ViT-B/16 as Hugging Face ViTModel counts it (pooler included): 86,389,248
    assert model_info(model_preset("vit-base-patch16-224"))["params"] == 86_389_248
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.ViTModel(transformers.ViTConfig())
    assert sum(p.numel() for p in hf.parameters()) == 86_389_248
    with torch.device("meta"):
        ours = build_model("vit-base-patch16-224")
    assert sum(p.numel() for p in ours.parameters()) == 86_389_248


def test_vit_config_errors():
    with pytest.raises(ConfigError, match="image_size=10 is not a multiple of model.patch_size=4"):
        build_model("vit-tiny", image_size=10, patch_size=4, channels=1)
    with pytest.raises(ConfigError, match="n_classes=3 applies to arch=vit only"):
        build_model("bert-tiny", n_classes=3)
    with pytest.raises(ConfigError, match="position='rope'"):
        build_model("vit-tiny", image_size=8, channels=1, position="rope")


def _tiny_hf_vit(n_labels=3, channels=3, side=8, patch=2, **kw):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=side,
                    patch_size=patch, num_channels=channels, num_labels=n_labels, **kw)
    torch.manual_seed(0)
    return _perturb(ViTForImageClassification(cfg))


def test_import_vit_for_image_classification(tmp_path):
    pytest.importorskip("transformers")
    from pretrainer.interop.hf import import_hf

    hf = _tiny_hf_vit()
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.n_classes == 3 and not ours.cfg.pooler
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(pixel_values=x).logits, **TOL)
        torch.testing.assert_close(ours.hidden_states(x), hf.vit(pixel_values=x).last_hidden_state, **TOL)


def test_export_vit_both_kinds(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pretrainer.interop.hf import export_hf

    ours = _perturb(build_model("vit-tiny", image_size=8, channels=3, n_classes=4))
    ours.class_names = ["a", "b", "c", "d"]
    export_hf(ours, tmp_path / "cls")
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "cls", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.id2label[2] == "c"
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).logits, ours(x).logits, **TOL)
    # a backbone with a pooler: ViTModel, pooled output equal
    base = _perturb(build_model("vit-tiny", image_size=8, channels=3, pooler=True))
    export_hf(base, tmp_path / "base")
    hf, info = transformers.ViTModel.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        out = hf.eval()(pixel_values=x)
        h = base.hidden_states(x)
        torch.testing.assert_close(out.last_hidden_state, h, **TOL)
        torch.testing.assert_close(out.pooler_output, base.pooled(h), **TOL)


def test_vit_import_refuses_what_it_cannot_map(tmp_path):
    pytest.importorskip("transformers")
    from pretrainer.errors import PretrainerError
    from pretrainer.interop.hf import import_hf

    _tiny_hf_vit(qkv_bias=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(PretrainerError, match="qkv_bias=False has no pretrainer equivalent"):
        import_hf(tmp_path / "hf")


# ----------------------------------------------------------------------------------------------
# MAE


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 16, 12)
    assert torch.equal(unpatchify(p, 2, 3, 8, 8), x)
    # patch 5 is row 1, column 1 of the 4 x 4 grid; its first entries are pixel (2, 2) of channels 0..2
    assert torch.equal(p[0, 5, :3], x[0, :, 2, 2])
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                    image_size=8, patch_size=2, num_channels=3, decoder_hidden_size=8,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=8)
    assert torch.equal(transformers.ViTMAEForPreTraining(cfg).patchify(x), p)


def test_mask_ratio_and_loss_on_masked_patches_only():
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    keep, restore, mask = random_masking(noise, 0.75)
    assert keep.shape == (5, 4) and torch.equal(mask.sum(1), torch.full((5,), 12.0))
    for b in range(5):  # the kept patches are the four with the least noise, and unmasked
        assert set(keep[b].tolist()) == set(noise[b].argsort()[:4].tolist())
        assert mask[b, keep[b]].sum() == 0
    # hand example: 2 patches of 2 values, the second hidden
    pred = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]], requires_grad=True)
    target = torch.tensor([[[5.0, 5.0], [0.0, 0.0]]])
    loss = masked_patch_loss(pred, target, torch.tensor([[0.0, 1.0]]))
    assert loss.item() == pytest.approx((1 + 9) / 2)
    loss.backward()
    assert torch.equal(pred.grad[0, 0], torch.zeros(2))  # the visible patch gets no gradient


def test_mae_loss_ignores_visible_patch_predictions():
    torch.manual_seed(0)
    enc = build_model("vit-tiny", image_size=8, channels=1)
    mae = MAEPretraining(enc, MAEConfig(decoder_d_model=16, decoder_layers=1, decoder_heads=2))
    x = torch.randn(3, 1, 8, 8)
    noise = torch.rand(3, 16)
    pred, mask = mae.reconstruct(x, noise)
    pred.retain_grad()
    loss = masked_patch_loss(pred, mae.targets(x), mask)
    loss.backward()
    assert torch.equal(pred.grad[mask == 0], torch.zeros_like(pred.grad[mask == 0]))
    assert (pred.grad[mask == 1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(mae.loss(x, noise), loss)
    t = mae.targets(x)  # norm_pix_loss: each patch's target has mean 0 and (unbiased) variance ~1
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)


def test_mae_encoder_matches_hf_vitmae(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pretrainer.interop.hf import import_hf

    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=8, patch_size=2, num_channels=1, decoder_hidden_size=16,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=32, mask_ratio=0.75)
    torch.manual_seed(0)
    hf = _perturb(transformers.ViTMAEForPreTraining(cfg))
    hf.save_pretrained(tmp_path / "mae")
    ours = import_hf(tmp_path / "mae")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    keep, restore, mask = random_masking(noise, 0.75)
    with torch.no_grad():
        out = hf.vit(pixel_values=x, noise=noise)
        torch.testing.assert_close(ours.hidden_states(x, keep=keep), out.last_hidden_state, **TOL)
    assert torch.equal(out.mask, mask) and torch.equal(out.ids_restore, restore)


# ----------------------------------------------------------------------------------------------
# Runs: MAE pretraining, exact resume, fine-tuning from it, export of the encoder


def _mae_cfg(digits, out, steps=4, **extra):
    over = ["model=vit-tiny", "objective=mae", f"data={digits}", f"out={out}", f"train.max_steps={steps}",
            "train.batch_size=16", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
            "train.warmup_steps=2", "train.plot=false", "model.n_layer=2", "mae.decoder_layers=1",
            "train.checkpoint_every=2", "train.threads=1"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, over)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_mae_run_resumes_exactly_then_finetunes(digits, tmp_path):
    import pretrainer
    from pretrainer.finetune.images import finetune_images
    from pretrainer.train.trainer import train

    train(_mae_cfg(digits, tmp_path / "a"), quiet=True)
    train(_mae_cfg(digits, tmp_path / "b"), quiet=True, stop_at=3)  # (a checkpoint at the stop, then 4)
    from pretrainer.train.trainer import resume_config

    train(resume_config(tmp_path / "b"), resume=True, quiet=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 4
    cfg = json.loads(json.dumps(load_config(str(tmp_path / "a" / "config.yaml")).to_dict()))
    assert cfg["model"]["image_size"] == 8 and cfg["train"]["seq_len"] == 17

    result = finetune_images(str(tmp_path / "a"), str(digits), str(tmp_path / "ft"), epochs=1, batch_size=256,
                             lr=1e-3, quiet=True)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["steps"] == 7 and result["eval_examples"] == 180
    ft = pretrainer.load(tmp_path / "ft")  # the classifier over the MAE encoder: its blocks start from the MAE run's
    assert ft.cfg.n_classes == 10
    evals = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals += [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in evals) and not any("val_ppl" in r for r in evals)  # MSE, classifier: no ppl

    # predict: the val split of a prepared folder, or a folder of image files of any size (resized)
    from pretrainer.cli import main
    from pretrainer.errors import CheckpointError
    from pretrainer.finetune.predict import predict_file

    assert predict_file(tmp_path / "ft", digits, tmp_path / "val.jsonl")["predictions"] == 180
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    with torch.no_grad():
        want = ft(ImageSplit(digits, "val").read(range(180))[0]).logits.argmax(-1)
    assert [r["label"] for r in rows] == [str(int(i)) for i in want] and set(rows[0]["probs"]) == {str(i) for i in range(10)}
    _png(tmp_path / "imgs" / "a.png", size=(16, 16), value=200)
    _png(tmp_path / "imgs" / "more" / "b.png", value=0)
    assert main(["predict", str(tmp_path / "ft"), "--input", str(tmp_path / "imgs"), "--out", str(tmp_path / "f.jsonl")]) in (0, None)
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["a.png", "b.png"] and all(r["label"] in r["probs"] for r in rows)
    with pytest.raises(CheckpointError, match="without a classifier"):
        predict_file(tmp_path / "a", digits, tmp_path / "no.jsonl")

    from pretrainer.interop.hf import export_hf

    enc = pretrainer.load(tmp_path / "a")
    assert type(enc).__name__ == "ViT" and enc.head is None
    transformers = pytest.importorskip("transformers")
    export_hf(enc, tmp_path / "hf")
    hf, info = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = ImageSplit(digits, "val").read(range(4))[0]
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).last_hidden_state, enc.hidden_states(x), **TOL)
