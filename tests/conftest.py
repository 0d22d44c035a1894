import os
from pathlib import Path

import pytest

# keep the tests' own thread use predictable on small machines
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A prepared data folder: the seeded synthetic corpus with a small byte-level BPE."""
    from pretrainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare("builtin:synthetic", "bpe:300", out, progress=False)
    return out
