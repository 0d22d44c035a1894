"""Instruction tuning of decoders (``--task sft``): the three row formats, labels on the answers
only, the chat template against ``transformers``' ``apply_chat_template``, packing against each
example alone, the built-in instruction set, one-line errors for bad rows, and the ``finetune``,
``generate --chat`` and ``chat`` commands on a tiny decoder."""

import io
import json

import pytest
import torch
from tokenizers import processors

from pretrainer.chat import chat_loop, default_chat_template, encode_chat, encode_conversation, render_chat
from pretrainer.cli import main
from pretrainer.common import IGNORE
from pretrainer.errors import DataError
from pretrainer.finetune.heads import InputFormat
from pretrainer.finetune.sft import SFTTask, answer_scores, pack
from pretrainer.model import make_model, model_config
from pretrainer.tokenization import Tok

WORDS = ("what is the name of this function def return self value list parameters module package yes no "
         "summarize user assistant answer question hello there general kenobi").split()


def corpus() -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=12)) + rng.choice(".?:,") for _ in range(200)]


@pytest.fixture(scope="module")
def tok() -> Tok:
    return Tok.train(corpus(), "bpe", 320)


ROWS = {
    "alpaca": ({"instruction": "What is the name?", "input": "def hello(self): return 1", "output": "hello"},
               ["hello"]),
    "messages": ({"messages": [{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "hello there"},
                               {"role": "assistant", "content": "general kenobi"},
                               {"role": "user", "content": "what is the module?"},
                               {"role": "assistant", "content": "email.utils"}]},
                 ["general kenobi", "email.utils"]),
    "prompt_completion": ({"prompt": "Is it a method? Answer yes or no.", "completion": "yes"}, ["yes"]),
}


def _encoded(tok, row):
    task = SFTTask()
    ex = task.example(row, "rows.jsonl line 1", require_labels=True)
    fmt = InputFormat.for_backbone("decoder", tok)
    feats = task.encode([ex], tok, fmt, max_len=256)
    return task, ex, feats, task.collate(feats, fmt.pad_id)


@pytest.mark.parametrize("fmt", list(ROWS))
def test_only_answer_tokens_carry_labels(tok, fmt):
    row, answers = ROWS[fmt]
    task, ex, feats, batch = _encoded(tok, row)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert labels.shape == ids.shape
    labelled = labels != IGNORE
    # a label is the next input token, and only where that token is part of an answer
    assert torch.equal(labels[:-1][labelled[:-1]], ids[1:][labelled[:-1]])
    assert not labelled[-1]
    # what is labelled, read in order, is each answer (after the template's space) and its <eos>
    assert tok.decode(labels[labelled].tolist()) == "".join(f" {a}<eos>" for a in answers)
    # and everything before the last answer is the prompt the model answers when evaluated
    prompt = tok.decode(feats[0]["prompt"])
    assert prompt.startswith("<eos>") and prompt.endswith("Assistant:")
    assert tok.decode(ids.tolist()) == prompt + f" {answers[-1]}<eos>"
    assert ex["label"] == answers[-1]


def test_template_starts_as_prompts_start(tok):
    """The default template's first token is pretrainer's prompt prefix: <eos> for our tokenizers
    (documents are separated by it), <bos> for one whose post-processor starts texts with it."""
    msgs = [{"role": "user", "content": "hello"}]
    assert encode_chat(tok, msgs)[0] == tok.eos_id
    llama_like = Tok.train(corpus(), "unigram", 300)
    llama_like.tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    llama_like = Tok(llama_like.tok)
    assert llama_like.document_prefix == [llama_like.bos_id]
    assert encode_chat(llama_like, msgs)[0] == llama_like.bos_id
    assert "bos_token" in default_chat_template(llama_like)


@pytest.mark.parametrize("preset,kind,bos_first", [("gpt-nano", "bpe", False), ("llama-tiny", "unigram", True)])
def test_exported_chat_template_gives_our_ids(tmp_path, preset, kind, bos_first):
    """A two-turn conversation: transformers' apply_chat_template on the exported tokenizer gives
    pretrainer's ids, with and without the generation prompt, and its assistant mask is ours."""
    transformers = pytest.importorskip("transformers")
    from pretrainer.interop.hf import export_hf

    tok = Tok.train(corpus() + ["héllo wörld ünïcode"] * 3, kind, 320)
    if bos_first:  # a Llama-style tokenizer: its post-processor starts every text with <bos>
        tok.tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        tok = Tok(tok.tok)
    tok.save(tmp_path / "tok")
    model = make_model(model_config(preset, vocab_size=tok.vocab_size, n_layer=1, max_seq_len=128))
    export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "user", "content": "What is the name of this héllo function?"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "And its module?"},
            {"role": "assistant", "content": "email.utils"}]
    ids, answer, _ = encode_conversation(tok, msgs)
    assert hf.apply_chat_template(msgs, return_dict=False) == ids
    assert ids[0] == (tok.bos_id if bos_first else tok.eos_id)
    assert hf.apply_chat_template(msgs[:3], add_generation_prompt=True, return_dict=False) == encode_chat(tok, msgs[:3])
    out = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert out["assistant_masks"] == [int(a) for a in answer]
    assert hf.chat_template == default_chat_template(tok)


def test_the_run_stores_its_template_and_a_custom_one_is_used(tok, tmp_path):
    """``--chat-template FILE``: the file's template lays out the examples and goes into the
    tokenizer's config (what the run saves and export carries)."""
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}")
    task = SFTTask(chat_template=str(tmp_path / "t.jinja"))
    ex = task.example({"prompt": "hello", "completion": "there"}, "x", True)
    feats = task.encode([ex], tok, InputFormat.for_backbone("decoder", tok), 64)
    assert tok.decode(feats[0]["ids"]) == "Q: hello\nA: there<eos>"
    assert tok.decode(feats[0]["prompt"]) == "Q: hello\nA:"
    assert tok.config["chat_template"] == (tmp_path / "t.jinja").read_text()
    tok.config.pop("chat_template")


def test_a_template_that_is_not_incremental_is_refused(tok):
    from pretrainer.errors import ConfigError

    odd = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="answers cannot be told from the prompt"):
        encode_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], odd)


BAD = [
    ({"instruction": "Name it.", "input": "def f(): pass"}, "line 2: no field 'output'"),
    ({"instruction": "Name it.", "output": "  "}, "line 2: field 'output' is empty; expected the answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]},
     "line 2: the conversation ends with a 'user' turn; expected it to end with the assistant's answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "line 2: turn 2 of 'messages' (assistant) is empty"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "line 2: turn 1 of 'messages' has role 'bot'"),
    ({"prompt": "hi"}, "line 2: no field 'completion'"),
    ({"question": "hi", "answer": "yo"}, "line 2: expected 'messages' (role/content turns), 'instruction' and"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, capsys, row, message):
    path = tmp_path / "train.jsonl"
    good = {"instruction": "Name it.", "output": "f"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    rc = main(["finetune", "gpt-nano", "--from-scratch", "--task", "sft", "--train", str(path),
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"error: {path} {message}" in err


def test_sft_refuses_other_architectures(tok):
    from pretrainer.errors import ConfigError

    task = SFTTask()
    ex = task.example(ROWS["alpaca"][0], "x", True)
    with pytest.raises(ConfigError, match="--task sft needs a decoder.*use --task text2text"):
        task.encode([ex], tok, InputFormat.for_backbone("encoder-decoder", tok), 64)


def test_pack_is_first_fit_longest_first():
    assert pack([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert pack([12, 1], 10) == [[0], [1]]  # too long: a row of its own


@pytest.mark.parametrize("fast", [False, True])
def test_packing_gives_each_example_its_loss_alone(tok, fast):
    """Rotary positions are relative, so an example packed after others (attending to itself
    only) has the loss it has alone: the token-weighted losses of packed and unpacked batches agree."""
    from pretrainer.model.fast import apply_fast_paths

    torch.manual_seed(0)
    model = make_model(model_config("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64,
                                    n_head=4, n_kv_heads=2, d_ff=128, max_seq_len=128)).eval()
    if fast:
        apply_fast_paths(model)
    rows = [{"instruction": "What is the name?", "output": "hello"},
            {"prompt": "Is it a method?", "completion": "yes it is a method of a class"},
            ROWS["messages"][0], {"instruction": "List the parameters.", "input": "def f(a, b)", "output": "a, b"}]
    fmt = InputFormat.for_backbone("decoder", tok)
    plain, packed = SFTTask(), SFTTask(packing=True)
    examples = [plain.example(r, "x", True) for r in rows]
    feats = plain.encode(examples, tok, fmt, 96)
    packed.encode(examples, tok, fmt, 96)
    a, b = plain.collate(feats, fmt.pad_id), packed.collate(feats, fmt.pad_id)
    assert len(b["input_ids"]) < len(a["input_ids"]) and "segments" in b
    assert int((a["labels"] != IGNORE).sum()) == int((b["labels"] != IGNORE).sum())
    with torch.no_grad():
        la, lb = plain.loss(model, a), packed.loss(model, b)
    assert float(lb) == pytest.approx(float(la), rel=1e-5, abs=1e-6)


def test_answer_scores_by_hand():
    s = answer_scores(["the cat sat", "yes", ""], ["the cat sat on the mat", "yes", "no"])
    # ROUGE-L F of "the cat sat" vs the reference: LCS 3, P 3/3, R 3/6 -> 2/3
    assert s["rougeL"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["exact_match"] == pytest.approx(1 / 3)


def test_builtin_instruct_holds_out_kinds_and_files():
    from pretrainer.finetune.builtin import INSTRUCTION_KINDS, _answer, _facts, builtin_rows

    task, train = builtin_rows("builtin:stdlib-instruct", "train")
    _, test = builtin_rows("builtin:stdlib-instruct", "eval")
    assert task == "sft" and len(train) == 2000 and len(test) > 400
    held = {k for k, (_, h) in INSTRUCTION_KINDS.items() if h}
    assert held and {r["task"] for _, r in train}.isdisjoint(held)
    assert {r["task"] for _, r in test} == set(INSTRUCTION_KINDS)
    assert all(r["held_out"] == (r["task"] in held) for _, r in test)
    files = lambda rows: {where.split()[-2].rsplit(":", 1)[0] for where, _ in rows}  # noqa: E731
    assert not files(train) & files(test)
    assert builtin_rows("builtin:stdlib-instruct", "train") == (task, train)  # deterministic
    # the answers, from the syntax tree, on a hand-made function
    f = {"code": "async def fetch(self, url, *rest, timeout=3, **kw):\n    x = 1\n    return x",
         "file": "urllib/request.py", "package": "urllib", "doc": "Fetch a URL and return it.", "method": True}
    facts = _facts(f)
    expect = {"name": "fetch", "parameters": "self, url, *rest, timeout, **kw", "package": "urllib",
              "has_default": "yes", "summarize": "Fetch a URL and return it.",
              "signature": "fetch(self, url, *rest, timeout, **kw)", "module": "urllib.request",
              "method": "yes", "first_parameter": "self"}
    assert {k: _answer(k, f, facts) for k in INSTRUCTION_KINDS} == expect


def test_chat_loop_keeps_history_and_resets(tok, monkeypatch):
    import pretrainer.chat as chat

    seen = []

    def fake_reply(model, tok, messages, **kw):
        seen.append([m["content"] for m in messages])
        return f"answer {len(seen)}"

    monkeypatch.setattr(chat, "reply", fake_reply)
    out = []
    n = chat_loop(None, tok, io.StringIO("hi\n\nmore\n/reset\nagain\n"), out.append, system="be brief")
    assert n == 3
    assert seen == [["be brief", "hi"], ["be brief", "hi", "answer 1", "more"], ["be brief", "again"]]
    assert out == ["answer 1", "answer 2", "(conversation reset)", "answer 3"]


def test_rendering_refusals_are_data_errors(tok):
    with pytest.raises(DataError, match="refuses the conversation: unknown role tool"):
        render_chat(default_chat_template(tok), [{"role": "tool", "content": "x"}], tok)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny decoder instruction-tuned from random weights on a file of 48 rows (2 epochs)."""
    root = tmp_path_factory.mktemp("sft")
    rows = []
    for i in range(48):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"instruction": "Repeat the words.", "input": f"{a} {b}", "output": f"{a} {b}",
                     "task": "repeat"} if i % 2 else
                    {"messages": [{"role": "user", "content": f"first word of: {a} {b}"},
                                  {"role": "assistant", "content": a}], "task": "first"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    Tok.train(corpus(), "bpe", 320).save(root / "tok")
    rc = main(["finetune", "gpt-nano", "--from-scratch", "--tokenizer", str(root / "tok"), "--task", "sft",
               "--train", str(root / "train.jsonl"), "--eval", str(root / "eval.jsonl"), "--out", str(root / "run"),
               "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--max-len", "64", "--max-new-tokens", "8",
               "--packing", "--quiet", "--json"])
    assert rc == 0
    return root


def test_finetune_sft_writes_a_run_that_answers(sft_run, capsys):
    run = sft_run / "run"
    capsys.readouterr()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("split") == "eval"]
    assert len(evals) == 2 and {"exact_match", "rougeL", "eval_loss", "repeat_rougeL", "first_rougeL"} <= set(evals[0])
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all("prediction" in p and p["gold"] for p in preds)
    config = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert "Assistant:" in config["chat_template"]
    # generate --chat and chat answer through the run's template
    assert main(["generate", str(run), "--chat", "--prompt", "Repeat the words.\n\nhello there",
                 "--temperature", "0", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["prompt"] == "Repeat the words.\n\nhello there" and "Assistant" not in out[0]["text"]
    import sys

    sys_stdin = sys.stdin
    try:
        sys.stdin = io.StringIO("hello there\n/reset\nfirst word of: yes no\n")
        assert main(["chat", str(run), "--max-new-tokens", "3"]) == 0
    finally:
        sys.stdin = sys_stdin
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1] == "(conversation reset)"
    # predict: generated answers for rows without one
    (sft_run / "ask.jsonl").write_text(json.dumps({"prompt": "first word of: yes no"}) + "\n")
    assert main(["predict", str(run), "--input", str(sft_run / "ask.jsonl"), "--out", str(sft_run / "p.jsonl")]) == 0
    pred = json.loads((sft_run / "p.jsonl").read_text())
    assert pred["text"] == "first word of: yes no" and isinstance(pred["prediction"], str)


def test_chat_refuses_encoder_runs_and_generate_chat_encdec(sft_run, capsys, tmp_path):
    from pretrainer.api import generate_samples
    from pretrainer.errors import PretrainerError

    model = make_model(model_config("t5-tiny", vocab_size=320, n_layer=1))
    with pytest.raises(PretrainerError, match="--chat applies to decoder runs"):
        generate_samples(model, Tok.train(corpus(), "bpe", 320), ["hi"], 4, 0.0, None, None, 0, chat=True)
