"""Encoder-decoder mode: sizes and logits against Hugging Face T5/BART, attention directions,
generation (cache, greedy, beams) and pretraining with the encoder-decoder objectives."""

import json

import pytest
import torch

from pretrainer.cli import main
from pretrainer.interop.hf import export_hf, import_hf
from pretrainer.model import build_model
from pretrainer.common import shift_right

transformers = pytest.importorskip("transformers")

SMALL = {  # reduced depth and vocabulary; widths, heads and options as in the preset
    "t5-small": dict(n_layer=2, n_decoder_layer=3, vocab_size=500),
    "t5-v1_1-small": dict(n_layer=2, vocab_size=500),
    "bart-base": dict(n_layer=2, n_decoder_layer=1, vocab_size=500, d_model=128, n_head=4, d_ff=256),
}
HF_CLASS = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}


def hf_param_count(preset: str) -> int:
    """The parameter count of the Hugging Face model with the preset's published config."""
    cls = (transformers.BartForConditionalGeneration if preset.startswith("bart")
           else transformers.T5ForConditionalGeneration)
    if preset.startswith("t5-v1_1"):
        cfg = transformers.T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    elif preset.startswith("t5"):
        cfg = transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
    else:
        cfg = transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6,
                                      encoder_attention_heads=12, decoder_attention_heads=12,
                                      encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    with torch.device("meta"):
        model = cls(cfg)
    count = sum(p.numel() for p in model.parameters())
    if preset.startswith("t5-v1_1") and model.lm_head.weight is model.shared.weight:
        # transformers 5 ties T5's head when it builds one and unties it when a checkpoint (as
        # google/t5-v1_1-small's) holds its own: count that separate head
        count += model.lm_head.weight.numel()
    return count


def test_t5_small_reports_published_count(capsys):
    assert main(["info", "t5-small", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 60_506_624
    assert info["params"] == hf_param_count("t5-small")


def test_v1_1_and_bart_counts_match_hugging_face():
    count = lambda p: sum(x.numel() for x in build_model(p, device="meta").parameters())  # noqa: E731
    assert count("t5-v1_1-small") == hf_param_count("t5-v1_1-small")
    # Hugging Face's BART keeps two position rows per stack that no input reaches (offset 2)
    assert count("bart-base") == hf_param_count("bart-base") - 2 * 2 * 768


def _inputs(vocab=500):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(7, vocab, (2, 11), generator=g)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    x[1, 8:] = 0  # <pad>
    y = torch.randint(7, vocab, (2, 6), generator=g)
    return x, mask, y


@pytest.mark.parametrize("preset", list(SMALL))
def test_logits_match_hugging_face_both_ways(preset, tmp_path):
    torch.manual_seed(0)
    model = build_model(preset, **SMALL[preset]).eval()
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ref = getattr(transformers, HF_CLASS[config["model_type"]]).from_pretrained(tmp_path).eval()
    x, mask, y = _inputs()
    with torch.no_grad():
        ours = model(x, decoder_input_ids=y, attention_mask=mask).logits
        theirs = ref(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        back = import_hf(tmp_path)(x, decoder_input_ids=y, attention_mask=mask).logits
    assert ours.shape == (2, 6, 500)
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())
    assert torch.equal(back, ours)
    # the padding mask matters: without it row 1's logits change
    with torch.no_grad():
        unmasked = model(x, decoder_input_ids=y, attention_mask=torch.ones_like(x)).logits
    assert not torch.allclose(unmasked[1], ours[1], atol=1e-5)


def test_encoder_is_bidirectional_and_decoder_causal():
    torch.manual_seed(0)
    model = build_model("t5-tiny", vocab_size=300, n_layer=2).eval()
    x = torch.randint(7, 300, (1, 10))
    y = torch.randint(7, 300, (1, 8))
    with torch.no_grad():
        base = model(x, decoder_input_ids=y).logits
        y2 = y.clone()
        y2[0, 5] = (y[0, 5] + 1) % 300
        later_target = model(x, decoder_input_ids=y2).logits
        x2 = x.clone()
        x2[0, -1] = (x[0, -1] + 1) % 300
        later_source = model(x2, decoder_input_ids=y).logits
    assert torch.equal(later_target[:, :5], base[:, :5])  # causal decoder
    assert not torch.allclose(later_target[:, 5:], base[:, 5:])
    assert not torch.allclose(later_source[:, 0], base[:, 0])  # every target position sees all of x


def _sequence_logprob(model, x, seq):
    labels = torch.tensor([seq])
    with torch.no_grad():
        logits = model(x, decoder_input_ids=shift_right(labels)).logits
    return torch.log_softmax(logits.float(), -1)[0, torch.arange(len(seq)), labels[0]].sum().item()


@pytest.mark.parametrize("preset", ["t5-tiny", "bart-base"])
def test_generation_cache_greedy_and_beams(preset):
    torch.manual_seed(1)
    kw = dict(vocab_size=60, n_layer=2, d_model=64, n_head=4, d_ff=128, max_seq_len=64)
    model = build_model(preset, **kw).eval()
    x = torch.randint(7, 60, (3, 9))
    x[2, 6:] = 0
    cached = model.generate(x, max_new_tokens=12)
    recomputed = model.generate(x, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, recomputed)
    beam1 = model.generate(x, max_new_tokens=12, num_beams=1)
    assert torch.equal(beam1, cached)
    batched = model.generate(x, max_new_tokens=8, num_beams=4, eos_id=None, length_penalty=0.0)
    for i in range(3):
        xi = x[i:i + 1, :6 if i == 2 else 9]
        greedy = model.generate(xi, max_new_tokens=8, eos_id=None)[0].tolist()
        beams = model.generate(xi, max_new_tokens=8, num_beams=4, eos_id=None, length_penalty=0.0)
        beam_seq = beams[0].tolist()
        assert len(beam_seq) == len(greedy) == 8
        assert _sequence_logprob(model, xi, beam_seq) >= _sequence_logprob(model, xi, greedy) - 1e-5
        # batched beam search gives each row what it gives alone (padding masked out)
        assert batched[i].tolist() == beam_seq
        # the cache changes nothing in beam search either
        nocache = model.generate(xi, max_new_tokens=8, num_beams=4, eos_id=None, length_penalty=0.0,
                                 use_cache=False)
        assert nocache[0].tolist() == beam_seq


def test_beam_search_stops_at_eos_and_pads():
    torch.manual_seed(0)
    model = build_model("t5-tiny", vocab_size=40, n_layer=1).eval()
    with torch.no_grad():  # make <eos> (id 2) the most likely token after two steps of anything
        model.lm_head.weight[2].zero_()
    x = torch.randint(7, 40, (2, 5))
    out = model.generate(x, max_new_tokens=10, num_beams=3)
    for row in out.tolist():
        if 2 in row:
            assert all(t == 0 for t in row[row.index(2) + 1:])


@pytest.mark.parametrize("objective", ["span", "denoise", "prefix_lm"])
def test_pretraining_objectives_lower_the_loss(objective, tmp_path, synthetic_t5_data):
    from pretrainer.config import load_config
    from pretrainer.train.trainer import train

    cfg = load_config(None, [
        "model=t5-tiny", "model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.d_ff=128",
        f"objective={objective}", f"data={synthetic_t5_data}", f"out={tmp_path / 'run'}",
        "train.max_steps=40", "train.batch_size=8", "train.seq_len=32", "train.lr=3e-3",
        "train.warmup_steps=5", "train.eval_every=40", "train.eval_batches=4", "train.log_every=20",
        "train.plot=false",
    ])
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5, (objective, vals)
    assert summary["step"] == 40


def test_span_needs_sentinels(tmp_path, capsys):
    from pretrainer.data.prepare import prepare

    prepare("builtin:synthetic", "char", tmp_path / "d", progress=False)
    code = main(["pretrain", "model=t5-tiny", "objective=span", f"data={tmp_path / 'd'}",
                 f"out={tmp_path / 'r'}", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "--sentinels" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def synthetic_t5_data(tmp_path_factory):
    from pretrainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("t5data") / "data"
    prepare("builtin:synthetic", "unigram:400", out, sentinels=50, progress=False)
    return out


def test_embed_and_generate_commands(tmp_path, synthetic_t5_data, capsys):
    import numpy as np

    run = tmp_path / "run"
    assert main(["pretrain", "model=t5-tiny", "model.n_layer=1", "model.d_model=64", "model.n_head=2",
                 "model.d_ff=128", "objective=span", f"data={synthetic_t5_data}", f"out={run}",
                 "train.max_steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_every=0",
                 "train.plot=false", "--quiet"]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("the red cat sees a dog .\ncolor = blue ; size = 3 ; name = ada\n")
    assert main(["embed", str(run), "--input", str(texts), "--out", str(tmp_path / "e.npy")]) == 0
    assert main(["embed", str(run), "--input", str(texts), "--pooling", "tokens",
                 "--out", str(tmp_path / "e.jsonl")]) == 0
    assert main(["embed", str(run), "--input", str(texts), "--batch-size", "1",
                 "--out", str(tmp_path / "one.npy")]) == 0
    mean = np.load(tmp_path / "e.npy")
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert mean.shape == (2, 64)
    for m, row in zip(mean, rows):  # the mean of the per-token vectors, padding left out
        assert np.allclose(np.asarray(row["embedding"]).mean(0), m, atol=1e-5)
    assert np.allclose(np.load(tmp_path / "one.npy"), mean, atol=1e-5)  # batching changes nothing
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the red cat", "--beams", "3",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["prompt"] == "the red cat" and isinstance(out[0]["text"], str)


def _first_repeat(seq: list[int], n: int, start: int = 0) -> int | None:
    """The first position from ``start`` on whose token completes an n-gram seen earlier in ``seq``."""
    seen = set()
    for t in range(n - 1, len(seq)):
        gram = tuple(seq[t - n + 1:t + 1])
        if gram in seen and t >= start:
            return t
        seen.add(gram)
    return None


def test_repeated_ngram_bans_by_hand():
    from pretrainer.model.generation import repeated_ngram_bans

    ids = torch.tensor([[5, 6, 7, 5, 6], [1, 1, 1, 2, 1]])
    assert repeated_ngram_bans(ids, 3) == [[7], []]  # "5 6" was followed by 7; "2 1" never came before
    assert repeated_ngram_bans(ids, 2) == [[7], [1, 1, 2]]  # 6 was followed by 7; 1 by 1, 1 and 2
    assert repeated_ngram_bans(ids, 1) == [[5, 6, 7, 5, 6], [1, 1, 1, 2, 1]]
    assert repeated_ngram_bans(ids, 6) == [[], []] and repeated_ngram_bans(ids, 0) == [[], []]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_blocks_only_what_it_must(n):
    """Greedy and beam search with ``no_repeat_ngram_size=n`` never repeat an n-gram, and greedy
    agrees with plain greedy up to the first place where plain greedy repeated one."""
    torch.manual_seed(3)
    model = build_model("t5-tiny", vocab_size=40, n_layer=1, d_model=32, n_head=2, d_ff=64).eval()
    x = torch.randint(7, 40, (4, 6))
    plain = model.generate(x, max_new_tokens=16, eos_id=None).tolist()
    blocked = model.generate(x, max_new_tokens=16, eos_id=None, no_repeat_ngram_size=n).tolist()
    beams = model.generate(x, max_new_tokens=16, eos_id=None, num_beams=3, no_repeat_ngram_size=n).tolist()
    assert any(_first_repeat(p, n) is not None for p in plain)  # the test has something to block
    for p, b, bm in zip(plain, blocked, beams):
        assert _first_repeat(b, n) is None and _first_repeat(bm, n) is None
        t = _first_repeat(p, n)
        assert b[:t] == p[:t] and (t is None or b[t] != p[t])
    # decoder-only: the prompt counts as well
    torch.manual_seed(3)
    gpt = build_model("gpt-nano", vocab_size=40).eval()
    prompt = torch.tensor([[7, 8, 9, 7, 8]])
    plain = gpt.generate(prompt, max_new_tokens=20)[0].tolist()
    out = gpt.generate(prompt, max_new_tokens=20, no_repeat_ngram_size=n)[0].tolist()
    assert _first_repeat(plain, n, start=5) is not None and _first_repeat(out, n, start=5) is None
    t = _first_repeat(plain, n, start=5)
    assert out[:t] == plain[:t]
