"""In-context learning: GPT-3 prompt layout, shots from a separate pool, truncation, batched
scoring equal to one-at-a-time and to the model's logits, chance accuracy of an untrained model,
the lm-evaluation-harness adapter, and the ``icl`` command."""

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrainer import build_model
from pretrainer.cli import main
from pretrainer.data.icl_synthetic import icl_documents, task_rows
from pretrainer.errors import DataError
from pretrainer.eval.icl import (
    Task,
    bootstrap_interval,
    builtin_task,
    continuation,
    draw_examples,
    evaluate,
    fit_context,
    load_task,
    render_prompt,
    token_f1,
)
from pretrainer.eval.scoring import (
    encode_pair,
    greedy_generate,
    loglikelihoods,
    rolling_loglikelihood,
    rolling_windows,
)
from pretrainer.tokenization import Tok

FR = Task(name="en-fr", instruction="Translate English to French:", template="{input} => {target}",
          rows=[{"input": "cheese", "target": "fromage"}],
          pool=[{"input": "sea otter", "target": "loutre de mer"},
                {"input": "peppermint", "target": "menthe poivrée"},
                {"input": "plush girafe", "target": "girafe peluche"}])


@pytest.fixture(scope="module")
def tok():
    return Tok.train([string.printable + "é"], "char", 0)


def tiny_gpt(tok, max_seq_len=128, seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                       max_seq_len=max_seq_len).eval()


def test_prompt_layout_is_gpt3s_for_zero_one_and_k_shots():
    row = FR.rows[0]
    assert render_prompt(FR, [], row) == "Translate English to French:\ncheese =>"
    assert render_prompt(FR, FR.pool[:1], row) == "Translate English to French:\nsea otter => loutre de mer\ncheese =>"
    assert render_prompt(FR, FR.pool, row) == (
        "Translate English to French:\n"
        "sea otter => loutre de mer\n"
        "peppermint => menthe poivrée\n"
        "plush girafe => girafe peluche\n"
        "cheese =>")
    assert continuation(FR, row, "fromage") == " fromage"  # the gap belongs to the continuation
    no_instruction = Task(name="t", rows=FR.rows, pool=FR.pool, separator="\n\n")
    assert render_prompt(no_instruction, FR.pool[:2], row) == (
        "sea otter => loutre de mer\n\npeppermint => menthe poivrée\n\ncheese =>")


def test_shots_come_from_the_pool_seeded_and_nested(tmp_path):
    for name in ("copy", "reverse", "successor", "lookup"):
        task = builtin_task(name, n=200)
        queries = {r["input"] for r in task.rows}
        assert not queries & {r["input"] for r in task.pool}, name
        assert task_rows(name, 200, "test") == task.rows  # deterministic
    task = builtin_task("copy", n=50)
    pool_ids = {id(r) for r in task.pool}
    for i in range(len(task.rows)):
        ex8 = draw_examples(task, i, 8, seed=3)
        assert {id(e) for e in ex8} <= pool_ids and len({id(e) for e in ex8}) == 8
        assert draw_examples(task, i, 3, seed=3) == ex8[:3]  # k shots are the start of k+5
    assert draw_examples(task, 0, 4, seed=3) != draw_examples(task, 0, 4, seed=4)
    # a JSONL task: rows with split pool/train are the pool, the rest the queries
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"input": "a", "target": "1", "split": "pool"}, {"input": "b", "target": "2", "split": "train"},
        {"input": "c", "target": "3"}, {"input": "d", "target": "4", "split": "test"}]) + "\n")
    t = load_task(str(f))
    assert [r["input"] for r in t.rows] == ["c", "d"] and [r["input"] for r in t.pool] == ["a", "b"]
    with pytest.raises(DataError, match="pool has only 2"):
        evaluate(tiny_gpt(Tok.train(["abcd1234 =>\n"], "char", 0)), Tok.train(["abcd1234 =>\n"], "char", 0),
                 t, [3])


def test_truncation_drops_the_oldest_examples_first_and_warns_once(tok):
    task = Task(name="long", rows=[{"input": "q" * 5, "target": "x"}] * 4,
                pool=[{"input": c * 10, "target": "y"} for c in "abcdefgh"], scoring="generate",
                max_new_tokens=2)
    examples = task.pool[:6]  # each example is 16 characters + newline
    full = len(render_prompt(task, examples, task.rows[0])) + 1  # + <eos>
    ids, kept, cut = fit_context(tok, task, examples, task.rows[0], full - 1)
    assert (kept, cut) == (5, True)
    assert tok.decode(ids[1:]) == render_prompt(task, examples[1:], task.rows[0])  # the oldest went
    ids, kept, cut = fit_context(tok, task, examples, task.rows[0], full - 40)
    assert kept == 3 and tok.decode(ids[1:]).startswith("dddd")
    assert fit_context(tok, task, examples, task.rows[0], full)[1:] == (6, False)
    model = tiny_gpt(tok, max_seq_len=64)
    warnings = []
    res = evaluate(model, tok, task, [0, 6], warn=warnings.append)
    assert len(warnings) == 1 and "oldest examples" in warnings[0] and "64-token" in warnings[0]
    assert res["shots"]["0"]["truncated"] == 0 and res["shots"]["6"]["truncated"] == 4
    assert res["shots"]["6"]["mean_shots_used"] < 6


def test_batched_loglikelihood_equals_one_at_a_time_and_the_model_logits(tok):
    model = tiny_gpt(tok)
    texts = [("sea otter =>", " loutre de mer"), ("cheese =>", " fromage"), ("", "x"),
             ("a much longer context, with more words in it =>", " yes"), ("b", " no thanks")]
    pairs = [encode_pair(tok, c, t) for c, t in texts]
    batched = loglikelihoods(model, pairs, batch_size=8)
    single = [loglikelihoods(model, [p], batch_size=1)[0] for p in pairs]
    for b, s, (ctx, cont) in zip(batched, single, pairs):
        assert b.n_tokens == s.n_tokens == len(cont)
        assert b.logprob == pytest.approx(s.logprob, abs=1e-5)
        assert b.greedy == s.greedy
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1]).logits.float(), dim=-1)[0]
        by_hand = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        greedy = all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        assert b.logprob == pytest.approx(by_hand, abs=1e-5)
        assert b.greedy == greedy
    assert pairs[2][0] == [tok.eos_id]  # an empty context is the <eos> prefix alone


def test_batched_greedy_generation_equals_model_generate(tok):
    model = tiny_gpt(tok)
    prompts = ["abc =>", "a longer prompt here =>", "x", "12345 => 54321\n678 =>"]
    ctxs = [[tok.eos_id] + tok.encode(p) for p in prompts]
    got = greedy_generate(model, tok, ctxs, max_new_tokens=6, stop=(), batch_size=4)
    for ctx, text in zip(ctxs, got):
        y = model.generate(torch.tensor([ctx]), 6, temperature=0.0, eos_id=tok.eos_id)[0, len(ctx):].tolist()
        y = y[:y.index(tok.eos_id)] if tok.eos_id in y else y
        assert text == tok.decode(y)
    stop = got[1][-1]
    cut = greedy_generate(model, tok, ctxs, max_new_tokens=6, stop=(stop,), batch_size=2)
    assert cut[1] == got[1][:got[1].index(stop)]


def test_rolling_windows_predict_every_token_once_with_the_most_context(tok):
    ids = list(range(10, 30))
    pairs = rolling_windows(ids, [2], max_len=8)
    predicted = [t for _, cont in pairs for t in cont]
    assert predicted == ids
    for ctx, cont in pairs:
        assert len(ctx) + len(cont) <= 9 and (ctx + cont)[-len(cont) - 1:] == ([2] + ids)[
            ([2] + ids).index(cont[0]) - 1:([2] + ids).index(cont[-1]) + 1]
    model = tiny_gpt(tok, max_seq_len=16)
    text = "short text"
    (one,) = loglikelihoods(model, [encode_pair(tok, "", text)])
    assert rolling_loglikelihood(model, tok, [text])[0] == pytest.approx(one.logprob, abs=1e-5)
    assert len(rolling_windows(tok.encode("x" * 40), [2], 16)) == 3  # longer than the window: works


def test_untrained_model_is_at_chance_on_multiple_choice(tok):
    model = tiny_gpt(tok)
    task = load_task("builtin:lookup", scoring="choice")
    res = evaluate(model, tok, task, [0], batch_size=32)["shots"]["0"]
    assert res["chance"] == 0.25 and res["n"] == 200
    lo, hi = res["interval"]
    assert lo <= 0.25 <= hi, res
    lo, hi = res["interval_sum"]
    assert lo <= 0.25 <= hi, res


def test_bootstrap_interval_and_token_f1():
    assert bootstrap_interval([1.0] * 10) == [1.0, 1.0]
    lo, hi = bootstrap_interval([0, 1] * 100, seed=1)
    assert 0.42 < lo < 0.5 < hi < 0.58
    assert bootstrap_interval([0, 1] * 100, seed=1) == [lo, hi]  # seeded
    assert token_f1("loutre de mer", "loutre de mer") == 1.0
    assert token_f1("la loutre", "loutre de mer") == pytest.approx(0.4)
    assert token_f1("", "x") == 0.0


def test_stdlib_task_and_icl_synthetic_corpus():
    task = builtin_task("stdlib", n=30)
    assert len(task.rows) == len(task.pool) == 30 and task.scoring == "choice"
    for row in task.rows:
        assert row["target"] in row["choices"] and len(set(row["choices"])) == 4
    assert not {r["input"] + r["target"] for r in task.rows} & {r["input"] + r["target"] for r in task.pool}
    docs = list(icl_documents(50))
    assert docs == list(icl_documents(50)) and all(" => " in d and d.endswith("\n") for d in docs)


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness


def test_lm_eval_adapter_loglikelihoods_equal_icl(tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from pretrainer.eval.lm_eval_adapter import PretrainerLM

    model = tiny_gpt(tok)
    task = load_task("builtin:copy", scoring="choice")
    task.rows = task.rows[:12]
    lm = PretrainerLM(model=model, tokenizer=tok, batch_size=16)
    requests, expected = [], []
    for i, row in enumerate(task.rows):
        examples = draw_examples(task, i, 2, seed=0)
        prompt = render_prompt(task, examples, row)
        for c in row["choices"]:
            requests.append(Instance("loglikelihood", row, (prompt, continuation(task, row, c)), i))
            expected.append(encode_pair(tok, prompt, continuation(task, row, c)))
    ours = loglikelihoods(model, expected, batch_size=16)
    theirs = lm.loglikelihood(requests)
    assert [(s.logprob, s.greedy) for s in ours] == [tuple(t) for t in theirs]  # same code, same batches
    # and icl's own accuracy at 2 shots uses exactly these scores
    res = evaluate(model, tok, task, [2], batch_size=16)["shots"]["2"]
    picks = [max(range(4), key=lambda c: ours[4 * q + c].per_token) for q in range(12)]
    acc = sum(row["choices"][p] == row["target"] for p, row in zip(picks, task.rows)) / 12
    assert res["accuracy"] == pytest.approx(acc)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text\n" * 30,), 0)])
    assert rolling[0] == pytest.approx(rolling_loglikelihood(model, tok, ["some text\n" * 30])[0])
    gen = lm.generate_until([Instance("generate_until", {}, ("abc =>", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    ctx = [tok.eos_id] + tok.encode("abc =>")
    assert gen == greedy_generate(model, tok, [ctx], 5, stop=("\n",))


def test_lm_eval_runs_a_local_yaml_task_offline(tok, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from pretrainer.eval.lm_eval_adapter import PretrainerLM, evaluate_local_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = task_rows("lookup", 20, "test")
    data = tmp_path / "lookup.jsonl"
    data.write_text("".join(json.dumps({"question": r["input"], "choices": r["choices"],
                                        "gold": r["choices"].index(r["target"])}) + "\n" for r in rows))
    (tmp_path / "lookup_local.yaml").write_text(
        "task: lookup_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}} =>\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: gold\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n")
    lm = PretrainerLM(model=tiny_gpt(tok), tokenizer=tok)
    results = evaluate_local_task(lm, tmp_path, "lookup_local")
    acc = results["results"]["lookup_local"]["acc,none"]
    # the same rows through icl (0 shots, sum of log-probabilities) give the same accuracy
    task = Task(name="lookup", rows=rows, pool=[], scoring="choice")
    res = evaluate(lm.model, tok, task, [0])["shots"]["0"]
    assert acc == pytest.approx(res["accuracy_sum"])


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pretrainer.config import RunConfig, TrainConfig, model_preset
    from pretrainer.data.prepare import prepare
    from pretrainer.train.trainer import train

    root = tmp_path_factory.mktemp("icl")
    prepare("builtin:icl-synthetic:300", "char", root / "data", progress=False)
    model = model_preset("gpt-nano")
    model.n_layer, model.d_model, model.n_head, model.max_seq_len = 1, 24, 2, 128
    train(RunConfig(model=model, data=str(root / "data"), out=str(root / "run"),
                    train=TrainConfig(max_steps=2, batch_size=2, seq_len=32, warmup_steps=0, eval_every=0,
                                      eval_batches=1, checkpoint_every=0, plot=False, device="cpu")),
          quiet=True)
    return root / "run"


def test_cli_icl_json(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["icl", str(tiny_run), str(tiny_run), "--task", "builtin:copy", "--shots", "0,2",
                 "--limit", "10", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"task", "scoring", "headline", "shots", "seed", "n_queries", "runs", "files"} <= set(res)
    assert res["shots"] == [0, 2] and res["n_queries"] == 10 and len(res["runs"]) == 2
    for run in res["runs"]:
        assert {"run", "params", "shots"} <= set(run) and set(run["shots"]) == {"0", "2"}
        for v in run["shots"].values():
            assert {"accuracy", "interval", "exact_match", "f1", "n", "truncated", "mean_shots_used"} <= set(v)
            assert v["interval"][0] <= v["accuracy"] <= v["interval"][1]
    for f in ("json", "png", "params_png"):
        assert Path(res["files"][f]).is_file()
    assert main(["icl", str(tiny_run), "--task", "builtin:lookup", "--scoring", "choice", "--shots", "1",
                 "--limit", "8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "1 shots" in text and "chance: 0.250" in text
    assert f"icl: {tiny_run}: 1 shots: accuracy" in captured.err and "(1/1 shot counts" in captured.err  # progress


def test_lm_eval_from_its_own_command_line_equals_icl(tiny_run, tmp_path, monkeypatch, capsys):
    """``pretrainer lm-eval`` is lm_eval's command line with the model 'pretrainer' registered: a
    local multiple-choice task scores as ``icl`` scores the same rows (0 shots, summed log-probs)."""
    pytest.importorskip("lm_eval")
    from pretrainer.api import load_with_tokenizer

    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(var, value)
    rows = task_rows("lookup", 16, "test")
    data = tmp_path / "lookup.jsonl"
    data.write_text("".join(json.dumps({"question": r["input"], "choices": r["choices"],
                                        "gold": r["choices"].index(r["target"])}) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lookup_cli.yaml").write_text(
        "task: lookup_cli\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}} =>\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "results"
    assert main(["lm-eval", "--model", "pretrainer", "--model_args", f"run={tiny_run}", "--tasks", "lookup_cli",
                 "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--output_path", str(out)]) == 0
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    model, tok = load_with_tokenizer(str(tiny_run), "cpu")
    task = Task(name="lookup", rows=rows, pool=[], scoring="choice")
    expected = evaluate(model, tok, task, [0])["shots"]["0"]["accuracy_sum"]
    assert written["results"]["lookup_cli"]["acc,none"] == pytest.approx(expected)


def test_lm_eval_without_the_package_is_a_one_line_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if lm-eval were not installed
    assert main(["lm-eval", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: lm-eval is not installed; pip install 'pretrainer[eval]' (or lm-eval)"]


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_task_files_are_one_line_errors(tiny_run, tmp_path, capsys):
    run = str(tiny_run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a"\n')
    _one_line_error(capsys, ["icl", run, "--task", str(bad)], "bad.jsonl line 2", "invalid JSON")
    bad.write_text('{"input": "a", "target": "b", "split": "pool"}\n{"input": "c"}\n')
    _one_line_error(capsys, ["icl", run, "--task", str(bad)], "bad.jsonl line 2", "no field 'target'")
    bad.write_text('{"input": "a", "target": "b", "choices": ["x", "y"]}\n')
    _one_line_error(capsys, ["icl", run, "--task", str(bad)], "target 'b' is not one of its choices")
    bad.write_text('{"input": "a", "target": "b"}\n')
    _one_line_error(capsys, ["icl", run, "--task", str(bad), "--shots", "1"], "1 shots", "pool has only 0")
    _one_line_error(capsys, ["icl", run, "--task", str(bad), "--shots", "one"], "--shots")
    _one_line_error(capsys, ["icl", run, "--task", str(tmp_path / "none.jsonl")], "none.jsonl", "no such file")
    _one_line_error(capsys, ["icl", run, "--task", "builtin:nope"], "builtin:nope", "builtin:copy")
    tpl = tmp_path / "t.yaml"
    tpl.write_text("instruction: hi\ntemplat: '{input} {target}'\n")
    _one_line_error(capsys, ["icl", run, "--task", "builtin:copy", "--template", str(tpl)], "t.yaml",
                    "unknown field 'templat'")
    tpl.write_text("template: '{target} is {input}'\n")
    _one_line_error(capsys, ["icl", run, "--task", "builtin:copy", "--template", str(tpl)], "end with {target}")
    tpl.write_text("data: rows.jsonl\n")
    _one_line_error(capsys, ["icl", run, "--task", str(tpl)], "rows.jsonl", "no such file")
    # through the installed entry point: exit status 2 and no traceback
    r = subprocess.run([sys.executable, "-m", "pretrainer", "icl", run, "--task", str(bad), "--shots", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_task_yaml_with_template_data_and_pool(tiny_run, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n"
                                                 for w in ["abc", "xyz", "pqr"]))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n"
                                                 for w in ["hello", "world"]))
    (tmp_path / "rev.yaml").write_text("name: rev\ninstruction: 'Reverse the word:'\ntemplate: '{input} -> {target}'\n"
                                       "data: rows.jsonl\npool: pool.jsonl\nmax_new_tokens: 4\n")
    task = load_task(str(tmp_path / "rev.yaml"))
    assert (task.name, task.scoring, len(task.rows), len(task.pool)) == ("rev", "generate", 3, 2)
    assert render_prompt(task, task.pool, task.rows[0]) == "Reverse the word:\nhello -> olleh\nworld -> dlrow\nabc ->"
    assert main(["icl", str(tiny_run), "--task", str(tmp_path / "rev.yaml"), "--shots", "0,2", "--json",
                 "--out", str(tmp_path / "o")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["runs"][0]["shots"]["2"]["prompt"].startswith("Reverse the word:\nhello -> olleh\n")


# ----------------------------------------------------------------------------------------------
# Slow: accuracy rises with shots after pretraining on the synthetic tasks' distribution


@pytest.mark.slow
def test_accuracy_rises_with_shots_after_pretraining_on_icl_synthetic(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "icl_shots.py"
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, str(bench), "--limit", "100", "--out", str(out),
                        "--json", str(tmp_path / "icl_shots.json")], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "icl_shots.json").read_text())
    acc = res["accuracy"]
    # without examples copy and reverse look alike; a few examples tell them apart
    for task in ("copy", "reverse"):
        assert acc[task]["8"]["accuracy"] > acc[task]["0"]["accuracy"] + 0.2, acc[task]
    mean = res["mean_accuracy_by_shots"]
    assert mean["8"] > mean["0"] + 0.1, mean
