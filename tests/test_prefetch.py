"""Batches built ahead on a background thread (issue 19) change nothing but when the work is done:
the same batches in the same order, the same losses bit for bit, for the causal LM, the masked LM
and span corruption; a request that was not foreseen is built on demand."""

import threading

import torch

from pretrainer.train.prefetch import Prefetcher
from pretrainer.train.trainer import train
from test_train import logged, tiny_cfg


class Recorder:
    order = "the builder's"

    def __init__(self):
        self.calls = []

    def batch(self, first, count):
        self.calls.append((first, count, threading.current_thread().name))
        return {"input_ids": torch.arange(first, first + count)}


def test_the_prefetcher_builds_the_next_strides_on_its_thread_and_serves_any_request():
    rec = Recorder()
    p = Prefetcher(rec, stride=8, count=4, depth=2)
    for first in (0, 8, 16, 40, 48):  # 40: data skipped (a rollback), not foreseen
        assert torch.equal(p.batch(first, 4)["input_ids"], torch.arange(first, first + 4))
    p.close()
    built = [c[0] for c in rec.calls]
    assert {0, 8, 16, 24, 32, 40, 48, 56, 64} >= set(built) >= {0, 8, 16, 40, 48}
    assert all(name.startswith("pretrainer-batches") for *_, name in rec.calls)  # never the caller's thread
    assert p.order == "the builder's"
    assert torch.equal(p.batch(3, 2)["input_ids"], torch.arange(3, 5))  # another size: built directly


def test_prefetching_gives_the_same_losses_bit_for_bit(synthetic_data, span_data, tmp_path):
    from pretrainer.config import model_preset

    for name, data, objective, preset in (("clm", synthetic_data, "clm", "gpt-nano"),
                                          ("mlm", synthetic_data, "mlm", "bert-tiny"),
                                          ("span", span_data, "span", "t5-tiny")):
        runs = []
        for prefetch in (0, 2):
            cfg = tiny_cfg(data, tmp_path / f"{name}-{prefetch}", max_steps=8, log_every=1, eval_every=4,
                           grad_accum=2, prefetch=prefetch)
            cfg.objective = objective
            cfg.model = model_preset(preset)
            cfg.model.vocab_size = None
            train(cfg, quiet=True)
            runs.append(logged(tmp_path / f"{name}-{prefetch}"))
        assert runs[0] == runs[1], name
