"""Continued pretraining from someone else's model (``init_from``): a GPT-2-layout model and
tokenizer saved by `transformers` (end token ``<|endoftext|>``), the data prepared with that
tokenizer, and the first logged loss equal to the Hugging Face model's on the same batch."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrainer.config import load_config
from pretrainer.data.tokens import TokenSplit
from pretrainer.errors import ConfigError
from pretrainer.train.objectives import get_objective
from pretrainer.train.trainer import train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A small GPT-2 saved by ``save_pretrained`` with a byte-level BPE whose only special token is
    ``<|endoftext|>`` (bos, eos and unk, as GPT-2's), dropout off so one step is deterministic."""
    from pretrainer.data.synthetic import synthetic_documents

    root = tmp_path_factory.mktemp("hf") / "gpt2"
    texts = list(synthetic_documents(300))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(["<|endoftext|>"])
    tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(root)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=48, n_layer=2, n_head=3,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root)
    (root / "corpus.txt").write_text("\n\n".join(texts[:200]))
    return root


def test_continued_pretraining_starts_from_the_hf_model(gpt2_folder, tmp_path):
    from pretrainer.cli import main

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--corpus", str(gpt2_folder / "corpus.txt"), "--tokenizer", str(gpt2_folder),
                 "--doc-separator", "\n\n", "--out", str(data)]) in (0, None)
    manifest = json.loads((data / "manifest.json").read_text())
    eot = transformers.AutoTokenizer.from_pretrained(gpt2_folder).eos_token_id
    assert manifest["special_ids"]["eos"] == eot  # documents end with <|endoftext|>

    cfg = load_config(None, [f"init_from={gpt2_folder}", f"data={data}", f"out={run}", "train.max_steps=5",
                             "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
                             "train.eval_every=0", "train.lr=1e-3", "train.warmup_steps=0", "train.plot=false"])
    train(cfg, quiet=True)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if "loss" in r]

    # the Hugging Face model's loss on the first batch the run trained on
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    first = get_objective(cfg).batches(TokenSplit(data, "train")).batch(0, 4)
    with torch.no_grad():
        logits = hf(first["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), first["labels"].flatten()).item()
    assert abs(train_losses[0] - expected) < 1e-4 * expected, (train_losses[0], expected)
    assert len(train_losses) == 5 and train_losses[-1] < train_losses[0]  # and training goes on


def test_init_from_refuses_data_of_another_tokenizer(gpt2_folder, synthetic_data, tmp_path):
    cfg = load_config(None, [f"init_from={gpt2_folder}", f"data={synthetic_data}", f"out={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"another tokenizer.*--tokenizer"):
        train(cfg, quiet=True)
    cfg = load_config(None, [f"init_from={tmp_path / 'nothing'}", f"data={synthetic_data}", f"out={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="init_from=.*no such"):
        train(cfg, quiet=True)
