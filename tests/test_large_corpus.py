"""The large-corpus memory benchmark's pieces (benchmarks/large_corpus.py) at a small size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import bkbench.corpora as bc
from bkbench.token_cache import load_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "large_corpus.py"


@pytest.fixture
def lc():
    spec = importlib.util.spec_from_file_location("large_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_corpus_has_the_asked_tokens_and_loads_as_dir_dataset(tmp_path, monkeypatch, lc):
    monkeypatch.setenv(bc.ENV_CACHE_DIR, str(tmp_path / "cache"))
    n = lc.write_corpus(tmp_path / "c", 10_000)
    assert 10_000 <= n < 10_000 + lc.WORDS_PER_LINE + 1
    lines = (tmp_path / "c" / "train.txt").read_text().splitlines()
    assert all(len(line.split()) == lc.WORDS_PER_LINE for line in lines)
    d = load_corpus(f"dir:{tmp_path / 'c'}")
    assert d.num_tokens["train"] == n
    assert d.num_tokens["valid"] == (lc.HELD_OUT_TOKENS // 21) * 21
    assert len(d.vocab) <= lc.VOCAB + 2


def test_verdict_compares_training_peaks(lc):
    small = {"train_mib": 500.0}
    assert lc.verdict({"train_mib": 500.0 + 1024}, small, 1.0) == (True, 1.0)
    ok, excess = lc.verdict({"train_mib": 500.0 + 1100}, small, 1.0)
    assert not ok and excess == pytest.approx(1100 / 1024)
