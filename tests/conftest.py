"""Shared fixtures: the WikiText-2 files beside the project, and a tiny synthetic corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session", autouse=True)
def _private_bkbench_cache(tmp_path_factory):
    """Token caches and downloads of a test session go to a temporary folder, never the user's
    ~/.cache/bkbench (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BKBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("bkbench-cache")))
        yield


@pytest.fixture
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "wiki.valid.tokens").is_file():
        pytest.skip(f"WikiText-2 files not found at {SHARED_DATA}")
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
