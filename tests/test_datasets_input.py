"""Hugging Face ``datasets`` as input (issue 19): a ``save_to_disk`` folder (Dataset or
DatasetDict), its Arrow shard, a ``Dataset`` and an ``IterableDataset`` prepare to the same token
shards as the same texts in a JSONL file; fine-tuning on a ``Dataset`` gives the numbers of the same
rows read from a file, and resumes from the copy it keeps."""

import json

import numpy as np
import pytest

from pretrainer.data.prepare import prepare
from pretrainer.errors import DataError

datasets = pytest.importorskip("datasets")


def shards(folder):
    return {s: np.fromfile(folder / f"{s}_00000.bin", dtype=np.uint16) for s in ("train", "val")}


def test_every_datasets_form_prepares_to_the_shards_of_the_same_texts(tmp_path):
    texts = [f"document {i}: " + "some words " * (i % 5) for i in range(120)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    ds = datasets.Dataset.from_dict({"content": texts, "n": list(range(120))})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    arrow = sorted((tmp_path / "ds").glob("*.arrow"))[0]
    reference = prepare(str(tmp_path / "docs.jsonl"), "char", tmp_path / "ref", text_field="content", progress=False)
    forms = {"folder": str(tmp_path / "ds"), "dict": str(tmp_path / "dd"), "arrow": str(arrow),
             "object": ds, "iterable": ds.to_iterable_dataset()}
    for name, corpus in forms.items():
        manifest = prepare(corpus, "char", tmp_path / name, text_field="content", progress=False)
        assert manifest["splits"] == reference["splits"], name
        assert all(np.array_equal(a, b) for a, b in zip(shards(tmp_path / name).values(),
                                                       shards(tmp_path / "ref").values())), name
    assert prepare(ds, "char", tmp_path / "o", text_field="content", progress=False)["sources"][0].startswith(
        "datasets.Dataset(120 rows")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, n\); name the text column"):
        prepare(ds, "char", tmp_path / "bad", progress=False)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "test_only"))
    with pytest.raises(DataError, match="a DatasetDict without a 'train' split"):
        prepare(str(tmp_path / "test_only"), "char", tmp_path / "bad2", text_field="content", progress=False)


def test_fine_tuning_on_a_dataset_equals_the_same_rows_from_a_file(tmp_path):
    from pretrainer.finetune.runner import finetune, resume_finetune
    from test_finetune_loop import setup

    kw = setup(tmp_path)  # TSV files: sentence<TAB>label
    read = lambda p: [dict(zip(("sentence", "label"), line.split("\t"))) for line in p.read_text().splitlines()[1:]]
    rows_train, rows_eval = read(tmp_path / "train.tsv"), read(tmp_path / "dev.tsv")
    from_files = finetune(out=str(tmp_path / "files"), **kw)
    train_ds = datasets.Dataset.from_list(rows_train)
    datasets.Dataset.from_list(rows_eval).save_to_disk(str(tmp_path / "dev_ds"))
    kw.update(train=train_ds, eval=str(tmp_path / "dev_ds"))
    from_datasets = finetune(out=str(tmp_path / "ds"), stop_at=8, **kw)
    assert from_datasets["stopped_at_step"] == 8
    assert (tmp_path / "ds" / "data" / "train.jsonl").is_file() and (tmp_path / "ds" / "data" / "eval.jsonl").is_file()
    resumed = resume_finetune(str(tmp_path / "ds"), quiet=True)  # reads the copies
    assert resumed["accuracy"] == from_files["accuracy"] and resumed["epoch"] == from_files["epoch"]
    lines = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = lines(tmp_path / "files"), lines(tmp_path / "ds")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], rel=1e-6)
