"""Shared fixtures: the WikiText-2 files, and a tiny synthetic corpus.

The tests that read WikiText-2 find it in ``$BKBENCH_DATA_DIR`` when that is set (the variable
bkbench itself reads), else in ``../shared/data/wikitext-2`` beside the repository; without
the files they are skipped with a reason that names the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("BKBENCH_DATA_DIR") or
                   Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2")
NEEDED_FILES = ("wiki.valid.tokens", "wiki.test.tokens")
MISSING_DATA = (f"WikiText-2 files ({', '.join(NEEDED_FILES)}) not found in {SHARED_DATA}; "
                "set BKBENCH_DATA_DIR to the folder that holds them")


def have_shared_data() -> bool:
    return all((SHARED_DATA / f).is_file() for f in NEEDED_FILES)


@pytest.fixture(scope="session", autouse=True)
def _private_bkbench_cache(tmp_path_factory):
    """Token caches and downloads of a test session go to a temporary folder, never the user's
    ~/.cache/bkbench (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BKBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("bkbench-cache")))
        yield


@pytest.fixture
def shared_data_dir() -> Path:
    if not have_shared_data():
        pytest.skip(MISSING_DATA)
    return SHARED_DATA


@dataclass
class TinyVocab:
    size: int
    eos_id: int = 0

    def __len__(self) -> int:
        return self.size


@dataclass
class TinyCorpus:
    """A stand-in for bkbench.data.WikiText2 with a learnable pattern, for engine tests."""
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: TinyVocab
    checksums: dict = field(default_factory=lambda: {"synthetic": "0"})
    # no text behind the ids: no bytes or words to report per (bits per byte, ppl per word)
    num_bytes: dict = field(default_factory=lambda: {"train": 0, "valid": 0, "test": 0})
    num_words: dict | None = None

    def to_dict(self) -> dict:
        return {"name": "synthetic", "train_tokens": self.train.numel(),
                "valid_tokens": self.valid.numel(), "test_tokens": self.test.numel()}


def make_corpus(vocab_size: int = 32, n_train: int = 4000, n_eval: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def stream(n):
        # a noisy counting pattern: next token is usually previous + 1
        x = torch.empty(n, dtype=torch.long)
        x[0] = 0
        noise = torch.randint(0, vocab_size, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.8
        for i in range(1, n):
            x[i] = (x[i - 1] + 1) % vocab_size if keep[i] else noise[i]
        return x

    return TinyCorpus(stream(n_train), stream(n_eval), stream(n_eval), TinyVocab(vocab_size))


@pytest.fixture
def tiny_corpus() -> TinyCorpus:
    return make_corpus()
