"""Evaluation: in-context learning (:mod:`.icl`, chain of thought in :mod:`.cot`), the scoring it shares with the
lm-evaluation-harness adapter (:mod:`.scoring`, :mod:`.lm_eval_adapter`), and the ``icl`` command
(:mod:`.cli`). Kept free of heavy imports so that the command line starts fast."""

#: ``builtin:NAME`` tasks of :func:`pretrainer.eval.icl.load_task`.
BUILTIN_TASKS = ("copy", "reverse", "successor", "lookup", "stdlib", "arith-cot", "arith-direct")
#: How a task is scored: log-likelihood of candidates, or greedy generation.
SCORINGS = ("choice", "generate")
