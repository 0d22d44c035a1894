"""The GPU path (skipped without CUDA, as on CI): a bf16-autocast, compiled training step through
the trainer's own pieces gives the float32 CPU step's loss closely, and a short run logs MFU."""

import json

import pytest
import torch

from conftest import objective

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_bf16_compiled_step_on_cuda_matches_float32_on_cpu():
    from pretrainer.model import build_model
    from pretrainer.train.parallel import compile_blocks

    torch.manual_seed(0)
    cpu = build_model("llama-tiny", n_layer=2, d_model=128, n_head=4, n_kv_heads=2, d_ff=256,
                      vocab_size=512, max_seq_len=128)
    gpu = build_model("llama-tiny", n_layer=2, d_model=128, n_head=4, n_kv_heads=2, d_ff=256,
                      vocab_size=512, max_seq_len=128).cuda()
    gpu.load_state_dict(cpu.state_dict())
    compile_blocks(gpu)
    x = torch.randint(0, 512, (4, 128))
    batch = {"input_ids": x, "labels": x.roll(-1, 1)}
    ref = objective("clm", cpu).loss(cpu, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = objective("clm", gpu).loss(gpu, {k: v.cuda() for k, v in batch.items()})
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


@cuda
def test_a_short_cuda_run_logs_tokens_per_second_and_mfu(synthetic_data, tmp_path):
    from pretrainer.config import load_config
    from pretrainer.train.trainer import train

    cfg = load_config(None, ["model=gpt-mini", f"data={synthetic_data}", f"out={tmp_path / 'r'}",
                             "train.max_steps=20", "train.log_every=10", "train.eval_every=0",
                             "train.device=cuda", "train.plot=false"])
    train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "tokens_per_s" in r]
    assert logged and all(r["tokens_per_s"] > 0 for r in logged)
    if "H100" in torch.cuda.get_device_name() or "A100" in torch.cuda.get_device_name():
        assert all(0 < r["mfu"] < 1 for r in logged)
