"""Text representations from a frozen encoder: ``pretrainer embed RUN --input FILE``.

The encoder of an encoder-decoder (T5, BART) or an encoder-only model (BERT) reads each text and
its final hidden states are returned, either mean-pooled over the text's tokens (padding left out)
or one vector per token. This is how a frozen text encoder serves another system, as Imagen
(Saharia et al. 2022) conditions on a frozen T5 encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, PretrainerError, storage


def _inputs(model, tok, texts: list[str], max_len: int) -> list[list[int]]:
    arch = model.cfg.arch
    if arch == "encoder-decoder":  # as in pretraining: the text, then end-of-text
        eos = tok.need("eos", "to end each text")
        return [(tok.encode(t)[:max_len - 1]) + [eos] for t in texts]
    if arch == "encoder":  # BERT: <cls> text <sep>
        cls, sep = tok.need("cls", "to start each text"), tok.need("sep", "to end each text")
        return [[cls] + tok.encode(t)[:max_len - 2] + [sep] for t in texts]
    raise PretrainerError(f"embed needs an encoder (arch encoder-decoder or encoder); this run is "
                          f"arch={arch}")


@torch.no_grad()
def embed_texts(model, tok, texts: list[str], pooling: str = "mean", batch_size: int = 32,
                max_len: int = 512) -> list[np.ndarray]:
    """One float32 array per text: [d_model] (``pooling="mean"``) or [tokens, d_model]
    (``pooling="tokens"``)."""
    if pooling not in ("mean", "tokens"):
        raise PretrainerError(f"--pooling {pooling}: expected mean or tokens")
    model.eval()
    max_len = min(max_len, model.cfg.max_seq_len)
    ids = _inputs(model, tok, texts, max_len)
    pad = tok.pad_id  # the pad token, else end-of-text: padded positions are masked out anyway
    out: list[np.ndarray] = []
    device = next(model.parameters()).device
    for i in range(0, len(ids), batch_size):
        rows = ids[i:i + batch_size]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.tensor(r)
            keep[j, :len(r)] = 1
        x, keep = x.to(device), keep.to(device)
        h = model.hidden_states(x, attention_mask=keep).float()  # an encoder-decoder's: the encoder's
        if pooling == "mean":
            pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
            out += list(pooled.cpu().numpy())
        else:
            out += [h[j, :len(r)].cpu().numpy() for j, r in enumerate(rows)]
    return out


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts of a file: one per line, or the ``field`` of each JSONL row (``.jsonl``)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder; expected a text file (one text per line, or JSONL)")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
        if "\0" in text:  # valid UTF-8, but a binary file's
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); expected one text per line, or JSONL") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{p}: empty; expected one text per line (or JSONL rows with '{field}')")
    if p.suffix != ".jsonl":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{p} line {n}: expected an object with a text field '{field}'")
        texts.append(row[field])
    return texts


def write_embeddings(path: str | Path, texts: list[str], vectors: list[np.ndarray], pooling: str) -> Path:
    """``.npy`` ([N, d_model], mean pooling only) or JSONL (``{"text", "embedding"}`` per row,
    per-token vectors as a list of lists); written to a temporary name and renamed."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    if p.suffix == ".npy" and pooling != "mean":
        raise PretrainerError(f"{p}: .npy holds one vector per text; use .jsonl for --pooling tokens")
    with storage(p, "write", cleanup=tmp):  # a full disk: one line, no temporary file left
        if p.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.stack(vectors).astype(np.float32))
        else:
            with open(tmp, "w") as f:
                for text, v in zip(texts, vectors):
                    f.write(json.dumps({"text": text, "embedding": np.round(v, 6).tolist()}) + "\n")
        tmp.replace(p)
    return p
