"""Next-sentence prediction (BERT, Devlin et al. 2019) and sentence-order prediction (ALBERT, Lan et
al. 2020): the ``BertForPreTraining`` layout (MLM head + ``cls.seq_relationship``) against Hugging
Face in both directions, and the worked behaviour of the ``mlm+nsp`` and ``mlm+sop`` objectives."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pretrainer.config import load_config, model_preset
from pretrainer.errors import ConfigError, PretrainerError
from pretrainer.interop.hf import export_hf, hf_folder_config, import_hf
from pretrainer.model import build_model
from pretrainer.model.info import model_info
from test_encoder import _perturb  # random weights moved off their init, as every parity test does

V = 300
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=V, max_seq_len=64, n_layer=2, d_model=32, n_head=4)


def _inputs(batch: int = 3, length: int = 20, seed: int = 1):
    """ids, two segments (0 then 1), and padding after position 15 of the last row."""
    ids = torch.randint(7, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[-1, 15:] = 0
    return ids, types, mask


# ----------------------------------------------------------------------------------------------
# The next-sentence head and BertForPreTraining


def test_head_is_a_linear_layer_on_the_pooled_cls_state():
    model = _perturb(build_model("bert-tiny", **SMALL, nsp_head=True))
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = model(ids, token_type_ids=types, attention_mask=mask)
        pooled = torch.tanh(out.hidden_states[:, 0] @ model.pooler.weight.T + model.pooler.bias)
        torch.testing.assert_close(out.nsp_logits, pooled @ model.nsp.weight.T + model.nsp.bias)
    assert out.nsp_logits.shape == (3, 2)
    assert build_model("bert-tiny", **SMALL)(ids).nsp_logits is None
    with pytest.raises(ConfigError, match="model.nsp_head=true needs arch=encoder with model.pooler=true"):
        dataclasses.replace(model_preset("bert-tiny"), pooler=False, nsp_head=True).validate()


def test_parameter_count_keeps_the_head_apart():
    transformers = pytest.importorskip("transformers")
    cfg = model_preset("bert-base")
    cfg.nsp_head = True
    info = model_info(cfg)
    assert info["params"] == 109_482_240  # BertModel, as without the head
    assert info["params_nsp_head"] == 768 * 2 + 2
    with torch.device("meta"):
        hf = transformers.BertForPreTraining(transformers.BertConfig())
    total = sum(p.numel() for p in hf.parameters())  # the decoder matrix is tied, counted once
    assert total == info["params"] + info["params_mlm_head"] + info["params_nsp_head"]


def _hf_pretraining(transformers, seed: int = 1):
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    return _perturb(transformers.BertForPreTraining(config), seed)


def test_import_bert_for_pretraining_gives_both_heads_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = _hf_pretraining(transformers)
    hf.save_pretrained(tmp_path)
    assert hf_folder_config(tmp_path).nsp_head  # read from the tensor names alone
    ours = import_hf(tmp_path)
    assert ours.cfg.nsp_head and ours.pooler is not None
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask)
        b = hf(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.prediction_logits, **TOL)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, **TOL)


def test_export_loads_in_bert_for_pretraining_with_both_heads_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = _perturb(build_model("bert-tiny", **SMALL, nsp_head=True))
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    ids, types, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, attention_mask=mask)
        b = hf(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.prediction_logits, **TOL)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, **TOL)
    back = import_hf(tmp_path)  # and back
    with torch.no_grad():
        torch.testing.assert_close(back(ids, token_type_ids=types, attention_mask=mask).nsp_logits,
                                   a.nsp_logits, atol=0, rtol=0)


def test_a_next_sentence_head_without_a_pooler_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    hf = _hf_pretraining(transformers)
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in hf.state_dict().items() if "pooler" not in k},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainerError, match="cls.seq_relationship without bert.pooler"):
        import_hf(tmp_path)


def test_init_from_bert_for_pretraining_trains_both_heads(tmp_path, synthetic_data):
    """Continued pretraining of a BertForPreTraining folder (bert-base-uncased's layout) with mlm+nsp."""
    transformers = pytest.importorskip("transformers")
    from pretrainer.train.trainer import train

    _hf_pretraining(transformers).save_pretrained(tmp_path / "hf")
    cfg = load_config(None, [f"init_from={tmp_path / 'hf'}", "objective=mlm+nsp", f"data={synthetic_data}",
                             f"out={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=4",
                             "train.seq_len=32", "train.eval_every=0", "train.eval_batches=2", "train.plot=false"])
    out = train(cfg, quiet=True)
    assert out["step"] == 2 and out["val_loss"] is not None
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert "val_nsp_accuracy" in lines[-1] and "val_nsp_loss" in lines[-1]


# ----------------------------------------------------------------------------------------------
# The objectives' examples


class _Stream:
    """A split-like token stream of hand-made documents, with a prepared folder's manifest and
    tokenizer (for the special ids and the masking)."""

    def __init__(self, like, docs: list[list[int]], eos: int = 2, cut: int = 7):
        import numpy as np

        self.dir, self.manifest, self.split = like.dir, like.manifest, "train"
        stream = np.array([t for d in docs for t in (*d, eos)], dtype=np.int64)
        self.shards = [stream[:cut], stream[cut:]]  # a shard boundary inside a document
        self.starts = [0, cut, len(stream)]
        self.n_tokens = len(stream)

    vocab_size = V

    def __len__(self):
        return self.n_tokens

    def read(self, start, length):
        import numpy as np

        return np.concatenate(self.shards)[start:start + length]


@pytest.fixture(scope="module")
def docs_stream(synthetic_data):
    from pretrainer.data.tokens import TokenSplit

    like = TokenSplit(synthetic_data, "train")
    # three documents of 20, 1 and 12 tokens, told apart by their values: 100.., 150, 200..
    return _Stream(like, [list(range(100, 120)), [150], list(range(200, 212)), []])


def test_documents_are_the_spans_between_end_of_text_tokens(docs_stream):
    from pretrainer.data.objectives import Documents

    docs = Documents(docs_stream, eos=2)
    # stream: 100..119 <eos> 150 <eos> 200..211 <eos> <eos>; one-token and empty documents dropped
    assert docs.starts.tolist() == [0, 23] and docs.ends.tolist() == [20, 35]
    assert [docs.at(p) for p in (0, 19, 20, 21, 22, 23, 34, 35, 36)] == [0, 0, 1, 1, 1, 1, 1, 1, 1]


def _pairs(builder, n: int, seed: int = 0):
    from pretrainer.data.objectives import sample_generator

    return [builder.pair(builder.order.start(g), sample_generator(seed, g)) for g in range(n)]


def _tokens(split, span):
    return split.read(span[0], span[1] - span[0]).tolist()


@pytest.mark.parametrize("which", ["hand-made", "synthetic"])
def test_next_sentence_pairs_are_half_random_and_never_from_the_same_document(which, docs_stream, synthetic_data):
    from pretrainer.data.objectives import Documents, SentencePairBatches
    from pretrainer.data.tokens import TokenSplit

    split = docs_stream if which == "hand-made" else TokenSplit(synthetic_data, "train")
    b = SentencePairBatches(split, 16, 0, "nsp")
    docs = Documents(split, eos=2)
    pairs = _pairs(b, 2000)
    random_share = sum(p.label for p in pairs) / len(pairs)
    assert 0.45 < random_share < 0.55
    for p in pairs:
        (a0, a1), (b0, b1) = p.first, p.second
        assert a1 > a0 and b1 > b0 and (a1 - a0) + (b1 - b0) <= 16 - 3
        assert docs.starts[p.first_doc] <= a0 and a1 <= docs.ends[p.first_doc]
        assert docs.starts[p.second_doc] <= b0 and b1 <= docs.ends[p.second_doc]
        if p.label == 0:  # the actual next segment: right after A, in A's document
            assert p.second_doc == p.first_doc and b0 == a1
        else:
            assert p.second_doc != p.first_doc
        if which == "hand-made":  # the values tell the documents apart
            a, bb = _tokens(split, p.first), _tokens(split, p.second)
            assert len({t // 100 for t in a}) == 1 and len({t // 100 for t in bb}) == 1
            assert (a[0] // 100 == bb[0] // 100) == (p.label == 0)
            if p.label == 0:
                assert bb[0] == a[-1] + 1


def test_sentence_order_swaps_exactly_the_two_consecutive_segments(docs_stream):
    from pretrainer.data.objectives import SentencePairBatches

    b = SentencePairBatches(docs_stream, 16, 3, "sop")
    pairs = _pairs(b, 2000, seed=3)
    assert 0.45 < sum(p.label for p in pairs) / len(pairs) < 0.55
    for p in pairs:
        assert p.first_doc == p.second_doc
        first, second = _tokens(docs_stream, p.first), _tokens(docs_stream, p.second)
        if p.label == 0:  # in order: the second segment continues the first
            assert p.first[1] == p.second[0] and second[0] == first[-1] + 1
        else:  # swapped: the first segment is the one that followed
            assert p.second[1] == p.first[0] and first[0] == second[-1] + 1
        joined = sorted(first + second)  # together: one run of consecutive tokens
        assert joined == list(range(joined[0], joined[0] + len(joined)))


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_examples_lay_out_cls_a_sep_b_sep_with_matching_labels(task, docs_stream):
    from pretrainer.common import IGNORE
    from pretrainer.data.objectives import SentencePairBatches, sample_generator

    b = SentencePairBatches(docs_stream, 16, 0, task)
    cls, sep, pad, mask_id = (docs_stream.manifest["special_ids"][k] for k in ("cls", "sep", "pad", "mask"))
    for g in range(40):
        start = b.order.start(g)
        pair = b.pair(start, sample_generator(0, g))
        ex = b.example(start, g, 0)
        first, second = _tokens(docs_stream, pair.first), _tokens(docs_stream, pair.second)
        used = len(first) + len(second) + 3
        original = torch.where(ex["labels"] != IGNORE, ex["labels"], ex["input_ids"])
        assert original.tolist() == [cls, *first, sep, *second, sep] + [pad] * (16 - used)
        assert ex["token_type_ids"].tolist() == [0] * (len(first) + 2) + [1] * (len(second) + 1) + [0] * (16 - used)
        assert ex["attention_mask"].tolist() == [1] * used + [0] * (16 - used)
        assert int(ex["sentence_labels"]) == pair.label
        picked = ex["labels"] != IGNORE
        assert not picked[~ex["attention_mask"].bool()].any()  # padding and specials never selected
        assert not torch.isin(original[picked], torch.tensor([cls, sep, pad])).any()
        changed = picked & (ex["input_ids"] != original)
        assert ((ex["input_ids"][changed] == mask_id) | (ex["input_ids"][changed] >= 7)).all()
    batch = b.batch(5, 4)
    assert all(torch.equal(batch[k], b.batch(5, 4)[k]) for k in batch)  # a pure function of the index
    assert batch["input_ids"].shape == (4, 16) and batch["sentence_labels"].shape == (4,)


def test_next_sentence_needs_two_documents(synthetic_data):
    from pretrainer.data.objectives import SentencePairBatches
    from pretrainer.data.tokens import TokenSplit
    from pretrainer.errors import DataError

    one = _Stream(TokenSplit(synthetic_data, "train"), [list(range(100, 150))])
    with pytest.raises(DataError, match="has 1 document.*objective=mlm\\+nsp needs at least 2"):
        SentencePairBatches(one, 16, 0, "nsp")
    assert SentencePairBatches(one, 16, 0, "sop").pair(0, torch.Generator().manual_seed(0)).first_doc == 0
    with pytest.raises(DataError, match="seq_len=4 leaves no room"):
        SentencePairBatches(one, 4, 0, "sop")


# ----------------------------------------------------------------------------------------------
# The objectives' loss, metrics and a run


@pytest.mark.parametrize("name", ["mlm+nsp", "mlm+sop"])
def test_loss_is_masked_lm_plus_the_sentence_cross_entropy(name, synthetic_data):
    import torch.nn.functional as F

    from conftest import objective
    from pretrainer.common import IGNORE
    from pretrainer.data.tokens import TokenSplit

    torch.manual_seed(0)
    model = _perturb(build_model("bert-tiny", **SMALL, nsp_head=True))
    obj = objective(name, model)
    batch = obj.batches(TokenSplit(synthetic_data, "train"), seq_len=32).batch(0, 8)
    with torch.no_grad():
        out = model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
        picked = batch["labels"] != IGNORE
        by_hand = (F.cross_entropy(out.logits[picked], batch["labels"][picked])
                   + F.cross_entropy(out.nsp_logits, batch["sentence_labels"]))
        torch.testing.assert_close(obj.loss(model, batch), by_hand, **TOL)
        sums = obj.eval_sums(model, batch)
    task = name[4:]
    metrics = obj.metrics({k: float(v) for k, v in sums.items()})
    correct = (out.nsp_logits.argmax(-1) == batch["sentence_labels"]).float().mean()
    assert metrics[f"val_{task}_accuracy"] == pytest.approx(float(correct))
    assert metrics[f"val_{task}_loss"] == pytest.approx(float(F.cross_entropy(out.nsp_logits, batch["sentence_labels"])), rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(float(F.cross_entropy(out.logits[picked], batch["labels"][picked])), rel=1e-5)


def test_objectives_need_the_head_and_an_encoder():
    with pytest.raises(ConfigError, match="objective=mlm\\+nsp needs model.nsp_head=true"):
        load_config(None, ["model=bert-tiny", "objective=mlm+nsp"]).validate(need_paths=False)
    with pytest.raises(ConfigError, match="objective=mlm\\+sop trains arch=encoder models"):
        load_config(None, ["model=gpt-nano", "objective=mlm+sop"]).validate(need_paths=False)
    load_config(None, ["model=bert-tiny", "model.nsp_head=true", "objective=mlm+sop",
                       "masking=word"]).validate(need_paths=False)


@pytest.mark.parametrize("name", ["mlm+nsp", "mlm+sop"])
def test_a_run_logs_the_sentence_task_and_resumes_exactly(name, tmp_path, synthetic_data):
    from pretrainer.train.trainer import resume_config, train

    task = name[4:]
    common = ["model=bert-tiny", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=64",
              "model.vocab_size=null", "model.nsp_head=true", f"objective={name}", f"data={synthetic_data}",
              "train.max_steps=6", "train.batch_size=4", "train.seq_len=32", "train.eval_every=3",
              "train.eval_batches=2", "train.log_every=1", "train.checkpoint_every=3", "train.plot=false"]
    train(load_config(None, common + [f"out={tmp_path / 'a'}"]), quiet=True)
    train(load_config(None, common + [f"out={tmp_path / 'b'}"]), stop_at=3, quiet=True)
    train(resume_config(tmp_path / "b"), resume=True, quiet=True)

    def lines(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]

    a, b = lines(tmp_path / "a"), lines(tmp_path / "b")
    evals = [r for r in a if "val_loss" in r]
    assert evals and all(0.0 <= r[f"val_{task}_accuracy"] <= 1.0 and r[f"val_{task}_loss"] > 0 for r in evals)
    losses = [r["loss"] for r in a if "loss" in r]
    assert losses == [r["loss"] for r in b if "loss" in r][-len(losses):]
