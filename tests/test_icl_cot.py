"""Chain-of-thought prompting in ``pretrainer icl``: answer extraction, stop strings and majority voting
on fixed generations (a scripted stand-in model writes them), rationales in the shots, the built-in
arithmetic task and its pretraining corpus, and one-line errors for bad options."""

import itertools
import json
import re
import string
from types import SimpleNamespace

import pytest
import torch

from pretrainer.cli import main
from pretrainer.data import arith_cot
from pretrainer.data.corpus import iter_documents
from pretrainer.errors import DataError
from pretrainer.eval.cot import ANSWER_IS, extract_answer, majority_vote, parse_stop
from pretrainer.eval.icl import Task, builtin_task, continuation, evaluate, load_task, render_prompt, run_icl
from pretrainer.eval.scoring import generate_texts
from pretrainer.tokenization import Tok


@pytest.fixture(scope="module")
def tok():
    return Tok.train([string.printable], "char", 0)


class ScriptedLM(torch.nn.Module):
    """A stand-in decoder that writes fixed texts, whatever it reads: the b-th batch it generates
    for (one row each: ``batch_size=1``) writes ``scripts[b % len(scripts)]`` one character per
    step, then ``<eos>``. Its logits are one-hot, so sampling at any temperature writes the same."""

    def __init__(self, tok, scripts, window=512):
        super().__init__()
        self.tok, self.scripts, self.batches = tok, [tok.encode(s) for s in scripts], 0
        self.cfg = SimpleNamespace(max_seq_len=window)
        self.tok_emb = torch.nn.Embedding(tok.vocab_size, 1)
        self.lm_head = self.tok_emb

    def hidden_states(self, x):
        raise AssertionError("generation only")

    def new_cache(self, batch, length):
        assert batch == 1, "use batch_size=1"
        self.batches += 1
        return {"script": self.scripts[(self.batches - 1) % len(self.scripts)], "step": 0}

    def forward(self, x, cache=None, last_only=False):
        script, i = cache["script"], cache["step"]
        cache["step"] += 1
        logits = torch.full((1, 1, self.tok.vocab_size), float("-inf"))
        logits[0, 0, script[i] if i < len(script) else self.tok.role_id("eos")] = 0.0
        return SimpleNamespace(logits=logits)


COT = Task(name="cot", template="Q: {input}\nA: {rationale}The answer is {target}.", separator="\n\n",
           max_new_tokens=64, rows=[{"input": "2 * 6 + 1 = ?", "target": "13"}],
           pool=[{"input": "3 + 4 * 2 = ?", "target": "11", "rationale": "4 * 2 = 8.\n3 + 8 = 11.\n"}])
# what a model might write after "A:": a rationale over three lines, a blank line, the next question
WORKED = " 2 * 6 = 12.\n12 + 1 = 13.\nThe answer is 13.\n\nQ: 5 + 5 = ?\nA: The answer is 10."


# ----------------------------------------------------------------------------------------------
# Answer extraction, majority voting and stop strings on fixed strings


def test_answer_extraction_reads_the_first_answer_sentence():
    assert extract_answer(WORKED) == "13"  # the first "the answer is", not the later one
    assert extract_answer(" 4 * 2 = 8.\n3 + 8 = 11.\nThe answer is 11.") == "11"
    assert extract_answer("the answer is: 3.5.") == "3.5"  # a decimal point stays, the final period goes
    assert extract_answer("THE ANSWER IS -4") == "-4"
    assert extract_answer("So the answer is 42. Next") == "42"
    assert extract_answer("The answer is Paris\nQ: next") == "Paris"
    assert extract_answer("4 * 2 = 8.\n3 + 8 = 11.") is None  # no answer sentence
    assert extract_answer("The answer is.") is None  # an empty answer is no answer
    assert extract_answer("  fromage \n", None) == "fromage"  # no pattern: the whole generation
    assert extract_answer("work... #### 42\n", r"#### (\d+)") == "42"  # a user regex: group 1
    assert extract_answer("x = 17;", r"\d+") == "17"  # no group: the whole match
    assert extract_answer("nothing", r"#### (\d+)") is None
    assert re.compile(ANSWER_IS).pattern == ANSWER_IS


def test_majority_vote_ignores_non_answers_and_breaks_ties_by_first_sample():
    assert majority_vote(["4", "3", "3"]) == ("3", 2)
    assert majority_vote(["3", "4", "4", None, "3"]) == ("3", 2)  # 3 and 4 tie: 3 was sampled first
    assert majority_vote(["b", "a", "a", "b"]) == ("b", 2)  # not alphabetical
    assert majority_vote([None, "7", None, None]) == ("7", 1)  # unanswered samples do not vote
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_parse_stop_reads_escapes():
    assert parse_stop("\\n\\n") == "\n\n"
    assert parse_stop("\\t") == "\t"
    assert parse_stop("\\\\n") == "\\n"  # an escaped backslash, then n
    assert parse_stop("###") == "###"
    assert parse_stop("\\x") == "\\x"  # other backslashes stay
    with pytest.raises(DataError, match="--stop"):
        parse_stop("")


def test_generation_stops_at_the_stop_string_not_the_first_newline(tok):
    ctx = [tok.role_id("eos")] + tok.encode("Q: 2 * 6 + 1 = ?\nA:")
    model = ScriptedLM(tok, [WORKED])
    assert generate_texts(model, tok, [ctx], 64, stop=["\n\n"], batch_size=1) == [WORKED.split("\n\n")[0]]
    assert generate_texts(model, tok, [ctx], 64, stop=["\n"], batch_size=1) == [" 2 * 6 = 12."]
    assert generate_texts(model, tok, [ctx], 64, stop=["13.", "\n\n"], batch_size=1) == [" 2 * 6 = 12.\n12 + 1 = "]
    assert generate_texts(model, tok, [ctx], 5, stop=["\n\n"], batch_size=1) == [" 2 * "]  # max_new_tokens
    short = ScriptedLM(tok, [" 12"])  # then <eos>
    assert generate_texts(short, tok, [ctx], 64, stop=["\n\n"], batch_size=1) == [" 12"]


# ----------------------------------------------------------------------------------------------
# Chain-of-thought tasks: prompts, defaults, evaluation on scripted generations


def test_rationales_in_shots_and_the_query_cut_where_the_answer_begins():
    row, shot = COT.rows[0], COT.pool[0]
    assert render_prompt(COT, [shot], row) == (
        "Q: 3 + 4 * 2 = ?\nA: 4 * 2 = 8.\n3 + 8 = 11.\nThe answer is 11.\n\nQ: 2 * 6 + 1 = ?\nA:")
    direct = {k: v for k, v in shot.items() if k != "rationale"}  # no rationale: the direct form
    assert render_prompt(COT, [direct], row) == "Q: 3 + 4 * 2 = ?\nA: The answer is 11.\n\nQ: 2 * 6 + 1 = ?\nA:"
    assert continuation(COT, row, "x") == " x"
    assert COT.chain_of_thought and COT.stops() == ["\n\n"] and COT.answer_pattern() == ANSWER_IS
    plain = Task(name="plain", rows=COT.rows, pool=[])
    assert not plain.chain_of_thought and plain.stops() == ["\n"] and plain.answer_pattern() is None
    # text after {target} also makes a chain-of-thought template (its answer must be read out)
    assert Task(name="t", rows=[], pool=[], template="Q: {input}\nA: {target}.").chain_of_thought


def test_evaluate_reads_the_answer_of_a_multi_line_rationale(tok):
    for stop, expected in ((None, 1.0), (["\n"], 0.0)):  # a newline stop cuts the rationale off
        task = Task(**{**COT.__dict__, "stop": stop})
        res = evaluate(ScriptedLM(tok, [WORKED]), tok, task, [0, 1], batch_size=1)["shots"]
        for k in ("0", "1"):
            assert res[k]["accuracy"] == expected and res[k]["answered"] == expected
        assert res["1"]["predictions"][0]["generation"] == (WORKED.split("\n\n")[0] if stop is None else " 2 * 6 = 12.")
    # a user regex instead of "the answer is"
    task = Task(**{**COT.__dict__, "answer": r"(\d+)\.\n\n"})
    res = evaluate(ScriptedLM(tok, [WORKED + "\n\n"]), tok, Task(**{**task.__dict__, "stop": ["Q:"]}), [0],
                   batch_size=1)
    assert res["shots"]["0"]["predictions"][0]["prediction"] == "13"


def test_self_consistency_scores_the_majority_answer(tok):
    """Five scripted rationales per query: 13 twice, 12 twice, one without an answer. The vote is a
    tie that goes to the answer sampled first; each query's five samples are consecutive batches."""
    texts = [" 12 + 1 = 13.\nThe answer is 13.", " 12 + 1 = 12.\nThe answer is 12.", " I do not know.",
             " The answer is 12.", " The answer is 13."]
    task = Task(**{**COT.__dict__, "rows": [{"input": "2 * 6 + 1 = ?", "target": "13"},
                                            {"input": "2 * 6 + 0 = ?", "target": "12"}]})
    res = evaluate(ScriptedLM(tok, texts), tok, task, [0], batch_size=1, samples=5, temperature=0.7)["shots"]["0"]
    first, second = res["predictions"]
    assert first["samples"] == ["13", "12", None, "12", "13"] and first["prediction"] == "13" and first["votes"] == 2
    assert second["prediction"] == "13"  # the same five texts: 13 again, wrong for this row
    assert res["accuracy"] == 0.5 and res["samples"] == 5 and res["temperature"] == 0.7
    assert res["accuracy_single"] == pytest.approx((2 / 5 + 2 / 5) / 2) and res["vote_share"] == pytest.approx(0.4)
    # the order decides the tie: 12 first now
    res = evaluate(ScriptedLM(tok, texts[1:] + texts[:1]), tok, task, [0], batch_size=1, samples=5,
                   temperature=0.7)["shots"]["0"]
    assert [p["prediction"] for p in res["predictions"]] == ["12", "12"] and res["accuracy"] == 0.5
    with pytest.raises(DataError, match="temperature > 0"):
        evaluate(ScriptedLM(tok, texts), tok, task, [0], samples=5)


def test_sampling_is_seeded(tok):
    from pretrainer import build_model

    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64).eval()
    ctxs = [[tok.role_id("eos")] + tok.encode(s) for s in ("Q: 1 + 2 = ?\nA:", "Q: 3 = ?\nA:")] * 3
    a = generate_texts(model, tok, ctxs, 12, stop=["\n\n"], temperature=1.0, seed=3)
    assert a == generate_texts(model, tok, ctxs, 12, stop=["\n\n"], temperature=1.0, seed=3)
    assert a != generate_texts(model, tok, ctxs, 12, stop=["\n\n"], temperature=1.0, seed=4)
    assert len(set(a[0::2])) > 1  # the same prompt, three different samples


def test_run_icl_records_how_it_generated(tok, tmp_path):
    res = run_icl([("scripted", ScriptedLM(tok, [WORKED]), tok)], COT, [1], out=tmp_path, batch_size=1)
    assert res["generation"] == {"stop": ["\n\n"], "answer": ANSWER_IS, "samples": 1, "temperature": 0.0,
                                 "max_new_tokens": 64}
    assert "after 'the answer is'" in res["headline"] and res["runs"][0]["shots"]["1"]["accuracy"] == 1.0
    assert json.loads((tmp_path / "cot.json").read_text())["generation"]["stop"] == ["\n\n"]


# ----------------------------------------------------------------------------------------------
# The built-in arithmetic task and its corpus


def test_arithmetic_steps_follow_precedence_and_are_right():
    assert arith_cot.solve([3, 4, 2], ["+", "*"]) == (["4 * 2 = 8.", "3 + 8 = 11."], 11)
    assert arith_cot.solve([7, 2, 5], ["-", "+"]) == (["7 - 2 = 5.", "5 + 5 = 10."], 10)  # left to right
    assert arith_cot.solve([2, 3, 4, 1], ["*", "-", "*"]) == (["2 * 3 = 6.", "4 * 1 = 4.", "6 - 4 = 2."], 2)
    for row in arith_cot.task_rows(100, "test") + arith_cot.task_rows(100, "pool"):
        expr = row["input"].removesuffix(" = ?")
        assert str(eval(expr)) == row["target"]  # Python's precedence is the same
        steps = row["rationale"].splitlines()
        assert len(steps) == arith_cot.TASK_OPS and steps[-1].endswith(f"= {row['target']}.")
        for step in steps:
            lhs, rhs = step.removesuffix(".").split(" = ")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= arith_cot.MAX_VALUE
    # every worked answer of a two-operation question fits the tasks' generation limit (characters)
    longest = 0
    for a, b, c in itertools.product(range(1, 10), repeat=3):
        for ops in itertools.product("+-*", repeat=2):
            steps, value = arith_cot.solve([a, b, c], list(ops))
            if all(0 <= int(s.split("= ")[1][:-1]) <= arith_cot.MAX_VALUE for s in steps):
                longest = max(longest, len(" " + "".join(s + "\n" for s in steps) + f"The answer is {value}."))
    assert longest <= arith_cot.MAX_NEW_TOKENS == builtin_task("arith-cot", n=5).max_new_tokens


def test_builtin_arith_tasks_ask_held_out_questions_directly_or_step_by_step():
    cot, direct = builtin_task("arith-cot", n=50), builtin_task("arith-direct", n=50)
    assert [r["input"] for r in cot.rows] == [r["input"] for r in direct.rows]  # the same questions
    assert [r["input"] for r in cot.pool] == [r["input"] for r in direct.pool]
    assert all("rationale" in r for r in cot.pool) and not any("rationale" in r for r in direct.pool)
    assert all(arith_cot.held_out(r) for r in cot.rows) and not any(arith_cot.held_out(r) for r in cot.pool)
    row, shot = cot.rows[0], cot.pool[0]
    assert render_prompt(cot, [shot], row) == (
        f"Q: {shot['input']}\nA: {shot['rationale']}The answer is {shot['target']}.\n\nQ: {row['input']}\nA:")
    assert render_prompt(direct, [direct.pool[0]], row) == (
        f"Q: {shot['input']}\nA: The answer is {shot['target']}.\n\nQ: {row['input']}\nA:")
    assert cot.stops() == direct.stops() == ["\n\n"] and cot.answer_pattern() == direct.answer_pattern() == ANSWER_IS
    assert load_task("builtin:arith-cot", n=50).rows == cot.rows  # deterministic


def test_arith_cot_corpus_mixes_both_formats_and_leaves_out_the_test_questions():
    docs = [doc for _, doc in iter_documents("builtin:arith-cot:400")]
    assert len(docs) == 400 and docs == list(itertools.islice(arith_cot.documents(), 400))
    questions, worked = set(), 0
    for doc in docs:
        examples = doc.rstrip("\n").split("\n\n")
        assert 1 <= len(examples) <= 8
        forms = {ex.split("\n")[1].startswith("A: The answer is") for ex in examples}
        assert len(forms) == 1  # one form per document
        worked += not forms.pop()
        for ex in examples:
            q = re.fullmatch(r"Q: (.*)\nA: (?:.*\n)*The answer is (\d+)\.", ex)
            assert q, ex
            questions.add(q.group(1))
            assert str(eval(q.group(1).removesuffix(" = ?"))) == q.group(2)
    assert 150 < worked < 250  # about half the documents are worked step by step
    test = {r["input"] for r in arith_cot.task_rows(200, "test")}
    assert not test & questions and not any(arith_cot.held_out({"input": q}) for q in questions)


# ----------------------------------------------------------------------------------------------
# Bad options and task files: one-line errors


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_chain_of_thought_options_are_one_line_errors(tmp_path, capsys):
    run = str(tmp_path / "no-run")  # the options are checked before any model is loaded
    icl = ["icl", run, "--task", "builtin:arith-cot"]
    _one_line_error(capsys, icl + ["--samples", "0"], "--samples 0", "positive")
    _one_line_error(capsys, icl + ["--samples", "5", "--temperature", "0"], "--samples 5", "--temperature > 0")
    _one_line_error(capsys, icl + ["--temperature", "-1"], "--temperature -1.0", ">= 0")
    _one_line_error(capsys, icl + ["--stop", ""], "--stop ''", "non-empty")
    _one_line_error(capsys, icl + ["--answer", "(\\d+"], "--answer", "not a regular expression")
    _one_line_error(capsys, ["icl", run, "--task", "builtin:lookup", "--scoring", "choice", "--stop", "\\n\\n"],
                    "--stop", "only for scoring 'generate'")
    _one_line_error(capsys, ["icl", run, "--task", "builtin:lookup", "--scoring", "choice", "--samples", "3"],
                    "--samples", "only for scoring 'generate'")
    tpl = tmp_path / "t.yaml"
    for text, needles in (("stop: 3\n", ("t.yaml", "field 'stop'")),
                          ("stop: []\n", ("t.yaml", "field 'stop'")),
                          ("answer: '(x'\n", ("t.yaml", "field 'answer'", "not a regular expression")),
                          ("template: 'Q: {input} A: {target} {rationale}'\n",
                           ("{rationale} must come before {target}",)),
                          ("template: 'Q: {rationale} {input} A: {target}'\n", ("must contain {input}",)),
                          ("scoring: choice\nchoices: ['1', '2']\n", ("scoring 'choice' needs a template",))):
        tpl.write_text(text)
        _one_line_error(capsys, icl + ["--template", str(tpl)], *needles)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input": "1 + 1 = ?", "target": "2"}\n{"input": "2 + 2 = ?", "target": "4", "rationale": 4}\n')
    _one_line_error(capsys, ["icl", run, "--task", str(rows)], "rows.jsonl line 2", "field 'rationale'")


def test_a_task_yaml_sets_stop_and_answer(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"input": "1 + 1", "target": "2"}) + "\n"
        + json.dumps({"input": "2 + 3", "target": "5", "rationale": "2 + 3 is 5", "split": "pool"}) + "\n")
    (tmp_path / "t.yaml").write_text("template: '{input}? {rationale} #### {target}'\ndata: rows.jsonl\n"
                                     "stop: '###END'\nanswer: '#### (\\d+)'\nseparator: \"\\n\\n\"\n")
    task = load_task(str(tmp_path / "t.yaml"))
    assert task.stops() == ["###END"] and task.answer_pattern() == r"#### (\d+)"
    assert render_prompt(task, task.pool, task.rows[0]) == "2 + 3? 2 + 3 is 5 #### 5\n\n1 + 1?"
