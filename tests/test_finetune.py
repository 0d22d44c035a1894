"""Fine-tuning: task files, sub-word label alignment, QA windows, metrics from their definitions,
one-line errors, the decoder head, learning an easy task, predict, and the built-in tasks."""

import contextlib
import io
import json
import random
import re
import subprocess
import sys

import pytest
import torch

from pretrainer.cli import main
from pretrainer.config import ModelConfig
from pretrainer.errors import ConfigError, DataError
from pretrainer.finetune import Predictor, finetune
from pretrainer.finetune import metrics as M
from pretrainer.finetune.files import read_conll, read_rows, read_squad
from pretrainer.finetune.heads import InputFormat, SequenceHead, TaskModel
from pretrainer.finetune.tasks import QATask, TaggingTask, align_labels, make_task, token_words, word_spans
from pretrainer.model import make_model
from pretrainer.model.loss import IGNORE
from pretrainer.tokenization import Tok

POS = "good great fine lovely superb nice".split()
NEG = "bad awful poor terrible dull ugly".split()
FILLER = "the movie was quite really a plot and acting story film".split()


def sentiment_tsv(path, n, seed):
    """GLUE layout: a header, then sentence<TAB>label; one polar word decides the label."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        lines.append(f"{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *args, needles=()):
    code, out, err = cli(capsys, *args)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Readers


def test_glue_tsv_csv_jsonl_conll_squad_readers(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('sentence\tlabel\nit \'s a "charming" film\t1\nbad , bad\t0\n\n')
    rows = read_rows(tsv)
    assert [r for _, r in rows] == [{"sentence": 'it \'s a "charming" film', "label": "1"},
                                    {"sentence": "bad , bad", "label": "0"}]
    assert rows[1][0].endswith("train.tsv line 3")
    task = make_task("classification")
    ex = task.load(str(tsv))
    assert task.columns == {"text": "sentence", "text_pair": None, "label": "label"}
    task.fit_labels(ex)
    assert task.labels == ["0", "1"] and ex[0]["text"] == 'it \'s a "charming" film'

    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('premise,hypothesis,gold\n"a, b",c,entail\nd,"e ""f""",contradict\n')
    task = make_task("classification", text_column="premise", text_pair_column="hypothesis", label_column="gold")
    ex = task.load(str(csv_file))
    assert ex[0]["text"] == "a, b" and ex[1]["text_pair"] == 'e "f"' and ex[1]["label"] == "contradict"

    jsonl = tmp_path / "sts.jsonl"
    jsonl.write_text('{"text": "a", "text_pair": "b", "label": 4.5}\n\n{"text": "c", "text_pair": "d", "label": 0}\n')
    ex = make_task("regression").load(str(jsonl))
    assert [e["label"] for e in ex] == [4.5, 0.0] and ex[0]["text_pair"] == "b"

    conll = tmp_path / "ner.conll"
    conll.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n")
    rows = read_conll(conll)
    assert [r for _, r in rows] == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    assert rows[1][0].endswith("line 6")

    squad = tmp_path / "dev.json"
    ctx = "Normandy is a region in France."
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "Where is Normandy?", "answers": [{"text": "France", "answer_start": 24}]}]}]}]}))
    (where, row), = read_squad(squad)
    assert row["id"] == "q1" and row["answers"] == [{"text": "France", "answer_start": 24}]


# ----------------------------------------------------------------------------------------------
# Sub-word alignment and QA windows


def test_tagging_labels_go_on_the_first_sub_token():
    words = ["unbelievably", "Brussels", "x"]
    text, spans = word_spans(words)
    assert text == "unbelievably Brussels x" and spans == [(0, 12), (13, 21), (22, 23)]
    # byte-level BPE style offsets: the space before a word belongs to that word's first piece
    offsets = [(0, 2), (2, 12), (12, 17), (17, 21), (21, 23)]
    assert token_words(offsets, spans, len(text)) == [0, 0, 1, 1, 2]
    assert align_labels([0, 0, 1, 1, -1, 2], [7, 8, 9]) == [7, IGNORE, 8, IGNORE, IGNORE, 9]

    # a real WordPiece vocabulary too small to hold the words whole
    tok = Tok.train(["unbelievably Brussels x y z"] * 5, "wordpiece", 40)
    task = TaggingTask(labels=["B-LOC", "O"])
    fmt = InputFormat.for_backbone("encoder", tok, 2)
    ex = [{"where": "t", "words": words, "tags": ["O", "B-LOC", "O"]}]
    f, = task.encode(ex, tok, fmt, max_len=64)
    pieces = [tok.id_to_token(i) for i in f["ids"]]
    assert pieces[0] == "<cls>" and pieces[-1] == "<sep>" and len(pieces) > 5  # words were split
    labelled = [(pieces[p], lab) for p, lab in enumerate(f["labels"]) if lab != IGNORE]
    assert labelled == [(pieces[f["word_pos"][0]], 1), (pieces[f["word_pos"][1]], 0), (pieces[f["word_pos"][2]], 1)]
    assert [pieces[p][:2] != "##" for p in f["word_pos"]] == [True, True, True]
    assert f["word_pos"][1] - f["word_pos"][0] > 1  # "unbelievably" has more than one piece


def test_qa_windows_map_a_known_answer_back_exactly():
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words[:41]) + " Grand Canal Docks " + " ".join(words[41:])
    answer_start = context.index("Grand Canal Docks")
    tok = Tok.train([context, "where is it ?"], "wordpiece", 200)
    task = QATask(stride=6)
    fmt = InputFormat.for_backbone("encoder", tok, 2)
    ex = {"where": "t", "id": "q", "question": "where is it ?", "context": context,
          "answers": [{"text": "Grand Canal Docks", "answer_start": answer_start}]}
    feats = task.encode([ex], tok, fmt, max_len=32)
    assert len(feats) >= 3  # the context needed several windows
    # windows cover every context token, consecutive ones share `stride` tokens
    n_ctx = len(tok.tok.encode(context, add_special_tokens=False).ids)
    wins = task.windows(n_ctx, 32 - 3 - len(tok.encode("where is it ?")))
    assert wins[0][0] == 0 and wins[-1][1] == n_ctx
    assert all(a[1] - b[0] == 6 for a, b in zip(wins, wins[1:]))
    holding = [f for f in feats if f["start"] != 0]
    assert holding and all(f["start"] == f["end"] - 2 for f in holding)  # three word pieces
    for f in feats:
        assert f["ids"][f["first"] - 1] == tok.sep_id
    # logits that point at the answer in one window give back the exact characters
    outputs = []
    for f in feats:
        out = torch.zeros(len(f["ids"]), 2)
        if f is holding[-1]:
            out[f["start"], 0] = out[f["end"], 1] = 10.0
        outputs.append(out)
    pred, = task.decode([ex], feats, outputs)
    assert (pred["answer"], pred["start"], pred["end"]) == ("Grand Canal Docks", answer_start, answer_start + 17)
    assert task.metrics([ex], [pred]) == {"exact_match": 1.0, "f1": 1.0}


# ----------------------------------------------------------------------------------------------
# Metrics, from their definitions


def test_metrics_against_hand_computed_values():
    gold, pred = [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]
    m = M.classification_metrics(gold, pred, 2)
    # class 1: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3; class 0: tp 1, fp 1, fn 1 -> 1/2
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*1 - 1*1) / sqrt(3*3*2*2)
    assert m["mcc"] == pytest.approx(1 / 6)

    r = M.regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): covariance 4 over variance 5
    assert r["pearson"] == pytest.approx(0.8)
    # rank differences (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15)
    assert r["spearman"] == pytest.approx(0.8)
    assert r["mse"] == pytest.approx(0.5)

    t = M.tagging_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    # entities: gold {PER 0-1, LOC 3}, predicted {PER 0-1}: P 1, R 1/2
    assert (t["precision"], t["recall"], t["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert t["accuracy"] == pytest.approx(3 / 4)
    t = M.tagging_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])  # a partial entity is wrong
    assert t["f1"] == 0.0

    assert M.normalize_answer("  The Cat's  (an) hat!") == "cats hat"
    assert M.exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert M.token_f1("x y z", "y z w") == pytest.approx(2 / 3)  # 2 shared of 3 and 3
    assert M.token_f1("a b c", "b c d") == pytest.approx(0.8)  # "a" is an article: P 1, R 2/3
    assert M.token_f1("b b", "b") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset: one b shared
    s = M.squad_metrics(["Denver Broncos", "x"], [["Broncos", "Denver Broncos"], ["y"]])
    assert s == {"exact_match": 0.5, "f1": 0.5}


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def test_malformed_task_files_are_one_line_errors(tmp_path, capsys):
    good = sentiment_tsv(tmp_path / "good.tsv", 20, 0)
    base = ["finetune", "bert-tiny", "--from-scratch", "--task", "classification", "--out", str(tmp_path / "r")]

    nolabel = tmp_path / "nolabel.tsv"
    nolabel.write_text("sentence\tscore\nfine\t1\n")
    one_line_error(capsys, *base, "--train", str(nolabel), needles=("nolabel.tsv line 2", "'label'"))
    one_line_error(capsys, *base, "--train", str(good), "--text-column", "review",
                   needles=("good.tsv", "no column 'review'"))

    unknown = tmp_path / "dev.tsv"
    unknown.write_text("sentence\tlabel\nfine\t1\nso so\tneutral\n")
    one_line_error(capsys, *base, "--train", str(good), "--eval", str(unknown),
                   needles=("dev.tsv line 3", "label 'neutral' not seen in training", "0, 1"))

    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    one_line_error(capsys, *base, "--train", str(empty), needles=("empty.tsv", "empty file"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    one_line_error(capsys, *base, "--train", str(header_only), needles=("header.csv", "no examples"))

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    one_line_error(capsys, *base, "--train", str(bad_json), needles=("bad.jsonl line 2", "invalid JSON"))

    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("sentence\tlabel\na\t1\nb\t0\textra\n")
    one_line_error(capsys, *base, "--train", str(ragged), needles=("ragged.tsv line 3", "3 fields, expected 2"))

    conll = tmp_path / "bad.conll"
    conll.write_text("EU B-ORG\nrejects\n")
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "tagging", "--train", str(conll),
                   "--out", str(tmp_path / "t"), needles=("bad.conll line 2", "token and its tag"))
    tags = tmp_path / "tags.jsonl"
    tags.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "tagging", "--train", str(tags),
                   "--out", str(tmp_path / "t"), needles=("tags.jsonl line 1", "2 tokens but 1 tags"))

    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "abc def", "qas": [
        {"id": "q", "question": "?", "answers": [{"text": "def", "answer_start": 3}]}]}]}]}))
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "qa", "--train", str(squad),
                   "--out", str(tmp_path / "q"), needles=("qas[0]", "not at character 3"))

    one_line_error(capsys, "finetune", "bert-tiny", "--task", "classification", "--train", str(good),
                   "--out", str(tmp_path / "r"), needles=("preset name", "--from-scratch"))
    one_line_error(capsys, *base, "--train", "builtin:stdlib-nope", needles=("unknown built-in task",))
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "ner", "--train", str(good),
                   "--out", str(tmp_path / "r"), needles=("--task ner", "classification"))
    assert not (tmp_path / "r").exists()

    # and from a real process: exit status 2, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "pretrainer", *base, "--train", str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Heads


def _tiny(arch, **kw):
    base = dict(arch=arch, n_layer=2, n_head=2, d_model=32, vocab_size=50, max_seq_len=32)
    if arch == "encoder":
        base.update(type_vocab_size=2, pooler=True, prenorm=False, embed_norm=True)
    return make_model(ModelConfig(**{**base, **kw}))


def test_decoder_head_reads_the_last_non_pad_token():
    torch.manual_seed(0)
    model = TaskModel(_tiny("decoder"), SequenceHead(32, 3), "sequence").eval()
    ids = torch.tensor([[1, 9, 10, 11, 2, 0, 0, 0], [1, 12, 13, 14, 15, 16, 17, 2]])
    mask = (torch.arange(8) < torch.tensor([[5], [8]])).long()
    out = model(ids, mask)
    alone = model(ids[:1, :5], mask[:1, :5])
    assert torch.allclose(out[0], alone[0], atol=1e-6)  # padding changes nothing
    other = ids.clone()
    other[0, 5:] = torch.tensor([30, 31, 32])  # garbage where the padding was
    assert torch.allclose(model(other, mask)[0], out[0], atol=1e-6)
    # ... but the head does read the last real token, and only for its own row
    changed = ids.clone()
    changed[0, 4] = 7
    new = model(changed, mask)
    assert not torch.allclose(new[0], out[0], atol=1e-4)
    assert torch.allclose(new[1], out[1], atol=1e-6)
    # reading position -1 instead (the padding) would have given another vector
    h = model.states(ids, mask)
    assert not torch.allclose(model.head(h[0, -1]), out[0], atol=1e-4)


def test_encoder_head_ignores_padding_and_uses_segments():
    torch.manual_seed(0)
    model = TaskModel(_tiny("encoder"), SequenceHead(32, 2), "sequence").eval()
    ids = torch.tensor([[4, 9, 10, 5, 11, 5, 0, 0]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    out = model(ids, mask, types)
    assert torch.allclose(out, model(ids[:, :6], mask[:, :6], types[:, :6]), atol=1e-5)
    # segment ids reach the <cls> state the head reads
    h = model.states(ids, mask, types)[:, 0]
    assert not torch.allclose(h, model.states(ids, mask, torch.zeros_like(types))[:, 0], atol=1e-3)


@pytest.mark.parametrize("kw", [{}, {"prenorm": True}, {"parallel_block": True, "prenorm": True},
                                {"position": "relative", "prenorm": True, "type_vocab_size": 0},
                                {"position": "rope", "share_layers": "all"}, {"moe": {"n_experts": 2, "top_k": 1}}],
                         ids=["post-norm", "pre-norm", "parallel", "relative-bias", "rope-albert", "moe"])
@pytest.mark.parametrize("fast", [False, True])
def test_the_cls_head_computes_only_the_cls_row_of_the_last_layer_with_the_same_numbers(kw, fast):
    """TaskModel reads <cls> through hidden_states(positions=slice(0, 1)): the last block runs its
    queries, residuals and MLP on that row only. Its logits and every gradient equal those from
    the full final states (training mode, dropout 0), fast paths or not. (A mixture of experts
    keeps every row: its capacity and balancing loss depend on the tokens routed.)"""
    from pretrainer.model.fast import apply_fast_paths

    torch.manual_seed(0)
    backbone = _tiny("encoder", **kw)
    if fast:
        apply_fast_paths(backbone)
    model = TaskModel(backbone, SequenceHead(32, 3, dropout=0.0), "sequence").train()
    ids = torch.tensor([[4, 9, 10, 5, 11, 5, 0, 0], [4, 12, 13, 14, 15, 16, 17, 5]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]) if model.cfg.type_vocab_size else None
    out = model(ids, mask, types)
    g = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    full = model.states(ids, mask, types)  # every row of the last layer
    assert full.shape[1] == 8
    ref = model.head(model.summary(full, mask))
    g_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_mean_pooling_reads_the_mean_of_the_real_positions():
    torch.manual_seed(0)
    for arch in ("encoder", "decoder"):
        model = TaskModel(_tiny(arch), SequenceHead(32, 2), "sequence", pooling="mean").eval()
        ids = torch.tensor([[4, 9, 10, 5, 0, 0], [4, 11, 12, 13, 14, 5]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        h = model.states(ids, mask)
        by_hand = torch.stack([h[0, :4].mean(0), h[1].mean(0)])
        assert torch.allclose(model(ids, mask), model.head(by_hand), atol=1e-6)
        garbage = ids.clone()
        garbage[0, 4:] = torch.tensor([30, 31])  # where the padding was: changes nothing
        assert torch.allclose(model(garbage, mask), model(ids, mask), atol=1e-6)
        first = TaskModel(model.backbone, model.head, "sequence").eval()  # the same weights, pooling=cls
        assert not torch.allclose(first(ids, mask), model(ids, mask), atol=1e-4)
    with pytest.raises(ValueError, match="pooling"):
        TaskModel(_tiny("encoder"), SequenceHead(32, 2), "sequence", pooling="max")


def test_mean_pooling_end_to_end_and_kept_for_predict(sentiment, tmp_path, capsys):
    train, dev, _ = sentiment
    run = tmp_path / "mean"
    code, stdout, err = cli(capsys, "finetune", "bert-tiny", "--from-scratch", "--train", str(train), "--eval",
                            str(dev), "--out", str(run), "--vocab-size", "120", "--pooling", "mean", "--json",
                            *ENCODER_ARGS)
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] >= 0.9  # one word decides the label
    assert yaml_load(run / "config.yaml")["options"]["pooling"] == "mean"
    p = Predictor(run)
    assert p.model.pooling == "mean"
    saved = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    again = p.predict([line.split("\t")[0] for line in dev.read_text().splitlines()[1:]])
    assert [a["label"] for a in again] == [s["label"] for s in saved]
    conll = tmp_path / "ner.conll"
    conll.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n")
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "tagging", "--train", str(conll),
                   "--out", str(tmp_path / "tag"), "--pooling", "mean", needles=("--pooling mean", "tagging"))
    one_line_error(capsys, "finetune", "bert-tiny", "--from-scratch", "--task", "classification", "--train",
                   str(train), "--out", str(tmp_path / "bad"), "--set", "pooling=max", needles=("pooling", "cls"))


def test_input_layouts_of_both_backbones():
    tok = Tok.train(["a b c"], "wordpiece", 20)
    enc = InputFormat.for_backbone("encoder", tok, 2)
    dec = InputFormat.for_backbone("decoder", tok, 0)
    a, b = [10, 11], [12]
    assert enc.build(a, b) == ([tok.cls_id, 10, 11, tok.sep_id, 12, tok.sep_id], [0, 0, 0, 0, 1, 1])
    assert dec.build(a, b) == ([tok.bos_id, 10, 11, tok.sep_id, 12, tok.eos_id], [0] * 6)
    assert dec.build(a) == ([tok.bos_id, 10, 11, tok.eos_id], [0] * 4)


# ----------------------------------------------------------------------------------------------
# Training end to end


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst")
    return sentiment_tsv(d / "train.tsv", 160, 1), sentiment_tsv(d / "dev.tsv", 64, 2), d


ENCODER_ARGS = ["--task", "classification", "--epochs", "3", "--lr", "2e-3", "--batch-size", "16",
                "--max-len", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def encoder_run(sentiment):
    """bert-tiny from scratch through the CLI with --json: (run folder, the printed JSON)."""
    train, dev, d = sentiment
    run = d / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["finetune", "bert-tiny", "--from-scratch", "--train", str(train), "--eval", str(dev),
                     "--out", str(run), "--vocab-size", "120", "--json", *ENCODER_ARGS])
    assert code == 0
    return run, json.loads(stdout.getvalue())


def test_easy_task_is_learned_and_the_run_folder_is_complete(encoder_run):
    run, result = encoder_run
    best = yaml_load(run / "config.yaml")["best"]
    assert best["metrics"]["accuracy"] >= 0.95  # chance is 0.5; one word decides the label
    assert set(best["metrics"]) == {"accuracy", "f1", "f1_macro", "mcc", "majority_baseline", "eval_loss", "one_class"}
    assert best["metrics"]["one_class"] is None  # a constant predictor would be named here
    assert json.loads((run / "labels.json").read_text()) == ["0", "1"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "accuracy" in line]
    assert len(evals) == 3 and max(e["accuracy"] for e in evals) == best["metrics"]["accuracy"]
    assert len(list((run / "checkpoints").iterdir())) == 1  # the best epoch only
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 64 and sum(p["label"] == p["gold"] for p in preds) / 64 == best["metrics"]["accuracy"]


def test_json_output_keys(encoder_run):
    _, result = encoder_run
    for key in ("accuracy", "f1", "f1_macro", "mcc", "epoch", "run", "train_examples", "eval_examples"):
        assert key in result
    assert result["accuracy"] == yaml_load(encoder_run[0] / "config.yaml")["best"]["metrics"]["accuracy"]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_same_seed_same_run(encoder_run, sentiment, tmp_path):
    """Seeded and reproducible. (A WordPiece tokenizer trained by `tokenizers` can break ties
    differently from run to run; the run's saved tokenizer makes a repeat exact.)"""
    run, result = encoder_run
    train, dev, _ = sentiment
    code = main(["finetune", "bert-tiny", "--from-scratch", "--train", str(train), "--eval", str(dev),
                 "--out", str(tmp_path / "again"), "--tokenizer", str(run / "tokenizer"), "--quiet", *ENCODER_ARGS])
    assert code == 0
    losses = lambda r: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]  # noqa: E731
    assert losses(tmp_path / "again") == losses(run)
    assert yaml_load(tmp_path / "again" / "config.yaml")["best"] == yaml_load(run / "config.yaml")["best"]


def test_predict_round_trip(encoder_run, sentiment, tmp_path, capsys):
    run, _ = encoder_run
    _, dev, _ = sentiment
    out = tmp_path / "pred.jsonl"
    code, stdout, err = cli(capsys, "predict", str(run), "--input", str(dev), "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["predictions"] == 64
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    saved = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == [s["label"] for s in saved]
    assert set(preds[0]) == {"index", "text", "label", "probs"} and set(preds[0]["probs"]) == {"0", "1"}
    rows = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    assert [p["index"] for p in preds] == list(range(64)) and [p["text"] for p in preds] == rows  # echoed
    # the same from Python, labels by name; unlabeled input is fine
    p = Predictor(run)
    assert p.labels == ["0", "1"]
    a, b = p.predict(["the movie was superb", "the movie was awful"])
    assert (a["label"], b["label"]) == ("1", "0")
    unlabeled = tmp_path / "new.jsonl"
    unlabeled.write_text('{"sentence": "a lovely film"}\n{"sentence": "a dull plot"}\n')
    main(["predict", str(run), "--input", str(unlabeled), "--out", str(out)])
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == ["1", "0"]


def test_predict_shows_progress_on_stderr(encoder_run, sentiment, tmp_path, capsys, monkeypatch):
    """Rows done, rows/s and eta on stderr (here after every chunk of 4 batches), stdout as before;
    --json prints its one object and nothing on stderr."""
    import pretrainer.progress

    monkeypatch.setattr(pretrainer.progress, "FIRST", 0.0)
    monkeypatch.setattr(pretrainer.progress, "EVERY", 0.0)
    run, _ = encoder_run
    _, dev, _ = sentiment
    out = tmp_path / "pred.jsonl"
    code, stdout, err = cli(capsys, "predict", str(run), "--input", str(dev), "--out", str(out))
    assert code == 0, err
    assert stdout.strip() == f"64 predictions written to {out}"
    lines = err.strip().splitlines()
    assert len(lines) == 1  # 64 rows: one chunk of 4 x 32
    assert re.fullmatch(r"predict: 64/64 rows, [\d.,]+ rows/s, \d+ s, eta 0 s", lines[0]), lines
    code, stdout, err = cli(capsys, "predict", str(run), "--input", str(dev), "--out", str(out), "--json")
    assert json.loads(stdout)["predictions"] == 64 and err == ""
    # several chunks: a line after each, counting up
    from pretrainer.finetune.predict import Predictor

    said = []
    p = Predictor(run, batch_size=4)
    preds = p.predict_examples(p.task.load(str(dev), "eval", require_labels=False), say=said.append)
    assert len(preds) == 64 and [int(line.split()[1].split("/")[0]) for line in said] == [16, 32, 48, 64]
    assert [x["label"] for x in preds] == [json.loads(line)["label"] for line in out.read_text().splitlines()]


def test_decoder_backbone_learns(sentiment, tmp_path):
    train, dev, _ = sentiment
    r = finetune("gpt-nano", "classification", str(train), str(tmp_path / "a"), eval=str(dev), epochs=3,
                 lr=2e-3, batch_size=16, max_len=16, from_scratch=True, vocab_size=120, seed=1, quiet=True)
    assert r["accuracy"] >= 0.9
    assert yaml_load(tmp_path / "a" / "config.yaml")["format"]["arch"] == "decoder"


def test_fine_tuned_run_as_backbone_and_from_scratch(encoder_run):
    encoder_run = encoder_run[0]
    from pretrainer.finetune.backbone import load_backbone
    from safetensors.torch import load_file

    trained = load_backbone(str(encoder_run))
    ckpt = next((encoder_run / "checkpoints").iterdir())
    saved = load_file(str(ckpt / "model.safetensors"))
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(trained.model.state_dict()[w], saved["backbone." + w])
    torch.manual_seed(0)
    fresh = load_backbone(str(encoder_run), from_scratch=True)
    assert fresh.model.cfg == trained.model.cfg and fresh.tok.vocab_size == trained.tok.vocab_size
    assert not torch.equal(fresh.model.state_dict()[w], saved["backbone." + w])


def test_tagging_regression_and_qa_run_end_to_end(tmp_path):
    rng = random.Random(0)
    names, cities = "Alice Bob Carol Dave".split(), "Paris Berlin Rome Oslo".split()
    with open(tmp_path / "train.conll", "w") as f:
        for _ in range(48):
            f.write(f"{rng.choice(names)} X B-PER\nmet X O\nme X O\nin X O\n{rng.choice(cities)} X B-LOC\n\n")
    r = finetune("bert-tiny", "tagging", str(tmp_path / "train.conll"), str(tmp_path / "tag"),
                 eval=str(tmp_path / "train.conll"), epochs=1, max_len=12, from_scratch=True, vocab_size=80, quiet=True)
    assert {"f1", "precision", "recall", "accuracy"} <= set(r)
    pred = Predictor(tmp_path / "tag").predict([["Bob", "met", "me"]])[0]
    assert pred["words"] == ["Bob", "met", "me"] and len(pred["tags"]) == 3

    rows = [{"text": f"{a} {b}", "label": float(len(a) + len(b))} for a in names for b in cities] * 2
    (tmp_path / "sts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = finetune("bert-tiny", "regression", str(tmp_path / "sts.jsonl"), str(tmp_path / "reg"),
                 eval=str(tmp_path / "sts.jsonl"), epochs=1, max_len=8, from_scratch=True, vocab_size=60, quiet=True)
    assert {"pearson", "spearman", "mse"} <= set(r)

    data = []
    for i in range(24):
        ctx = f"{rng.choice(names)} lives in {rng.choice(cities)} and works in {rng.choice(cities)} ."
        start = ctx.index(" in ") + 4
        ans = ctx[start:ctx.index(" and")]
        data.append({"paragraphs": [{"context": ctx, "qas": [
            {"id": str(i), "question": "where does the person live ?", "answers": [{"text": ans, "answer_start": start}]}]}]})
    (tmp_path / "squad.json").write_text(json.dumps({"data": data}))
    r = finetune("bert-tiny", "qa", str(tmp_path / "squad.json"), str(tmp_path / "qa"), eval=str(tmp_path / "squad.json"),
                 epochs=1, max_len=24, stride=2, from_scratch=True, vocab_size=80, quiet=True)
    assert {"exact_match", "f1"} <= set(r)
    out = Predictor(tmp_path / "qa").predict([{"question": "where ?", "context": "Bob lives in Rome ."}])[0]
    assert out["answer"] == "Bob lives in Rome ."[out["start"]:out["end"]]


# ----------------------------------------------------------------------------------------------
# Built-in tasks


def test_builtin_tasks_are_deterministic_balanced_and_split_by_file():
    from pretrainer.finetune.builtin import PACKAGES, builtin_rows

    task, train = builtin_rows("builtin:stdlib-package:8", "train")
    _, again = builtin_rows("builtin:stdlib-package:8", "train")
    _, held = builtin_rows("builtin:stdlib-package:8", "eval")
    assert task == "classification" and train == again
    labels = [r["label"] for _, r in train]
    assert set(labels) == set(PACKAGES) and all(labels.count(p) == 8 for p in PACKAGES)
    assert all(labels.count(p) <= 2 for p in PACKAGES for labels in [[r["label"] for _, r in held]])
    file_of = lambda where: where.split()[-1].rsplit(":", 1)[0]  # noqa: E731
    assert not {file_of(w) for w, _ in train} & {file_of(w) for w, _ in held}
    code = train[0][1]["text"]
    assert code.startswith(("def ", "async def ")) and '"""' not in code.split("\n")[1]

    task, pairs = builtin_rows("builtin:stdlib-docstring:40", "train")
    assert len(pairs) == 40 and [r["label"] for _, r in pairs].count("matched") == 20
    assert all(set(r) == {"text", "text_pair", "label"} for _, r in pairs)

    t = make_task("classification")
    ex = t.load("builtin:stdlib-docstring:40", "train")
    assert t.columns["text_pair"] == "text_pair" and "text_pair" in ex[0]


def test_backbones_from_hugging_face_and_run_folders(tmp_path):
    from pretrainer.finetune.backbone import load_backbone
    from pretrainer.interop.hf import export_hf, import_run
    from pretrainer.model import model_config

    tok = Tok.train(["some words to make a small vocabulary from"] * 3, "wordpiece", 60)
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = make_model(model_config("bert-tiny", vocab_size=tok.vocab_size, n_layer=1, max_seq_len=32))
    export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    w = "blocks.0.attn.qkv.weight"
    hf = load_backbone(str(tmp_path / "hf"))
    assert torch.equal(hf.model.state_dict()[w], model.state_dict()[w])
    assert hf.tok.vocab_size == tok.vocab_size and hf.origin["kind"] == "hf"
    import_run(tmp_path / "hf", tmp_path / "run")
    run = load_backbone(str(tmp_path / "run"))
    assert torch.equal(run.model.state_dict()[w], model.state_dict()[w]) and run.origin["kind"] == "run"
    scratch = load_backbone(str(tmp_path / "run"), from_scratch=True)
    assert scratch.model.cfg == run.model.cfg and scratch.tok.vocab_size == run.tok.vocab_size
    assert not torch.equal(scratch.model.state_dict()[w], model.state_dict()[w])


def test_conll_prediction_input_needs_no_tags(tmp_path):
    f = tmp_path / "new.conll"
    f.write_text("Peter\nlives\n\nEU B-ORG\n")
    task = TaggingTask(labels=["B-ORG", "O"])
    ex = task.load(str(f), require_labels=False)
    assert [e["words"] for e in ex] == [["Peter", "lives"], ["EU"]]
    with pytest.raises(DataError, match="new.conll line 1: expected a token and its tag"):
        task.load(str(f))


def test_select_loss_keeps_the_epoch_with_the_lowest_eval_loss(sentiment, tmp_path):
    train, dev, _ = sentiment
    r = finetune("bert-tiny", "classification", str(train), str(tmp_path / "s"), eval=str(dev), epochs=3,
                 select="loss", lr=3e-3, batch_size=64, max_len=12, from_scratch=True, vocab_size=120, quiet=True)
    evals = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["epoch"] for e in evals] == [1, 2, 3] and all("eval_loss" in e for e in evals)
    best = min(evals, key=lambda e: e["eval_loss"])
    assert r["selected_by"] == "eval_loss" and r["epoch"] == best["epoch"]
    assert r["accuracy"] == best["accuracy"]  # the kept weights are that epoch's
    state = json.loads(next((tmp_path / "s" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert (state["epoch"], state["metric"]) == (best["epoch"], "eval_loss")
    with pytest.raises(ConfigError, match="--select best: expected one of metric, loss"):
        finetune("bert-tiny", "classification", str(train), str(tmp_path / "x"), eval=str(dev), select="best",
                 from_scratch=True, vocab_size=120, quiet=True)


def test_patience_stops_when_the_score_stops_improving(sentiment, tmp_path):
    train, dev, _ = sentiment
    # a learning rate too small to change any prediction: the score never improves after epoch 1
    r = finetune("bert-tiny", "classification", str(train), str(tmp_path / "p"), eval=str(dev), epochs=5,
                 patience=1, lr=1e-12, batch_size=64, max_len=12, from_scratch=True, vocab_size=120, quiet=True)
    assert (r["epoch"], r["epochs_run"]) == (1, 2)
    state = json.loads(next((tmp_path / "p" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["epoch"] == 1


def test_a_classifier_that_answers_one_class_is_flagged_beside_the_majority_baseline(tmp_path, capsys):
    """A learning rate of ~0 keeps the head at its start: if it answers one class for every example,
    the run warns, and the summary carries the majority-class baseline to read its accuracy against."""
    from pretrainer.finetune.metrics import classification_metrics
    from pretrainer.tokenization import Tok

    assert classification_metrics([0, 0, 1, 0], [0, 0, 0, 0], 2)["majority_baseline"] == 0.75
    train = sentiment_tsv(tmp_path / "train.tsv", 64, 1)
    dev = sentiment_tsv(tmp_path / "dev.tsv", 32, 2)
    texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
    Tok.train(texts, "wordpiece", 120).save(tmp_path / "tok")
    code = main(["finetune", "bert-tiny", "--from-scratch", "--task", "classification", "--train", str(train),
                 "--eval", str(dev), "--tokenizer", str(tmp_path / "tok"), "--epochs", "1", "--lr", "1e-9",
                 "--max-len", "16", "--seed", "0", "--out", str(tmp_path / "run"), "--quiet", "--json"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 0 and 0.5 <= result["majority_baseline"] <= 1.0
    preds = {json.loads(line)["label"] for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()}
    assert ("predicts" in err and "for every evaluation example" in err) == (len(preds) == 1)
