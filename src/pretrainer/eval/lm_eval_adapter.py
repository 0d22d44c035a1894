"""lm-evaluation-harness (``lm-eval``) adapter: evaluate our decoder runs on lm-eval tasks.

Needs the optional dependency: ``pip install 'pretrainer[eval]'``. The three request types are
answered by the same functions as ``pretrainer icl`` (:mod:`.scoring`), so a prompt and a
continuation get the same log-likelihood whichever tool asks::

    from pretrainer.eval.lm_eval_adapter import PretrainerLM, evaluate_local_task
    lm = PretrainerLM(run="runs/a")
    evaluate_local_task(lm, "my_tasks/", "my_task")     # task YAMLs in my_tasks/, data from local files

or, once this module is imported, ``lm_eval.simple_evaluate(model="pretrainer",
model_args="run=runs/a", ...)``. Generation is greedy only (``do_sample`` / a positive
``temperature`` are refused); nothing is loaded from the Hugging Face hub.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import PretrainerError
from .scoring import (
    check_decoder,
    encode_context,
    encode_pair,
    greedy_generate,
    loglikelihoods,
    rolling_loglikelihood,
)


@register_model("pretrainer")
class PretrainerLM(LM):
    """An lm-eval ``LM`` over a pretrainer decoder: a run folder (``run=``) or a loaded
    ``model`` and ``tokenizer`` (a :class:`pretrainer.tokenization.Tok`)."""

    def __init__(self, run: str | None = None, model=None, tokenizer=None, device: str = "cpu",
                 batch_size: int | str = 16, max_gen_toks: int = 64, **_ignored):
        super().__init__()
        if run is not None:
            from ..api import load_with_tokenizer as _load_run_and_tokenizer

            model, tokenizer = _load_run_and_tokenizer(str(run), device)
        if model is None or tokenizer is None:
            raise PretrainerError("PretrainerLM needs run=RUN, or model= and tokenizer=")
        check_decoder(model)
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.tok_emb.weight.device

    @property
    def eot_token_id(self) -> int | None:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_seq_len)

    def tok_encode(self, text: str, **_kw) -> list[int]:
        return self.tok.encode(text)

    def tok_decode(self, ids, **_kw) -> str:
        return self.tok.decode(ids)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, ctx, cont) for ctx, cont in (r.args for r in requests)]
        return [(s.logprob, s.greedy) for s in loglikelihoods(self.model, pairs, self.batch_size)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return rolling_loglikelihood(self.model, self.tok, [r.args[0] for r in requests], self.batch_size)

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            if kw.get("do_sample") or float(kw.get("temperature", 0) or 0) > 0:
                raise PretrainerError("the pretrainer lm-eval adapter generates greedily only "
                                      "(do_sample=False, temperature=0)")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if self.tok.eos_id is not None:
                eos_text = self.tok.id_to_token(self.tok.eos_id)
                until = [u for u in until if u != eos_text]  # <eos> stops generation anyway
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        for (until, max_new), idx in groups.items():
            ctxs = [encode_context(self.tok, requests[i].args[0]) for i in idx]
            texts = greedy_generate(self.model, self.tok, ctxs, max_new, stop=until, batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]


def evaluate_local_task(lm: PretrainerLM, include_path: str | Path, tasks: str | list[str], *,
                        include_defaults: bool = False, **kwargs) -> dict:
    """Run lm-eval's ``simple_evaluate`` on task YAMLs found under ``include_path`` (their data
    from local files, e.g. ``dataset_path: json`` with ``data_files``); returns lm-eval's results.
    lm-eval's own task catalogue is not indexed unless ``include_defaults`` (it takes seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    kwargs.setdefault("bootstrap_iters", 0)
    kwargs.setdefault("log_samples", False)
    return simple_evaluate(model=lm, tasks=[tasks] if isinstance(tasks, str) else list(tasks),
                           task_manager=TaskManager(include_path=str(include_path), include_defaults=include_defaults),
                           **kwargs)
