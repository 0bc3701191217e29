"""Tests of bkbench.data against the real WikiText-2 validation and test files.

The files are found as conftest.SHARED_DATA says ($BKBENCH_DATA_DIR, else the shared folder
next to the repository); tests that need them are skipped, naming the variable, without them.  No test touches the network: the Hugging Face Hub
download function is replaced by fakes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import bkbench.data as bd
from bkbench.data import DataError, load_wikitext2

from conftest import SHARED_DATA as SHARED

FILES = ("wiki.valid.tokens", "wiki.test.tokens", "wiki.valid.raw", "wiki.test.raw")
EXPECTED_TOKENS = {"valid": 217_646, "test": 245_569}
EXPECTED_LINES = {"valid": 3_760, "test": 4_358}

needs_shared = pytest.mark.skipif(
    not all((SHARED / f).is_file() for f in FILES),
    reason=f"WikiText-2 files ({', '.join(FILES)}) not found in {SHARED}; set BKBENCH_DATA_DIR "
           "to the folder that holds them")


def _hub_unreachable(*args, **kwargs):
    raise ConnectionError("no network in tests")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No environment leakage, a private cache, and a Hub that is never reached."""
    import huggingface_hub

    monkeypatch.delenv(bd.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv(bd.ENV_CACHE_DIR, str(tmp_path / "cache-root"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _hub_unreachable)


def _text(name: str) -> str:
    return (SHARED / name).read_bytes().decode("utf-8")


def _copy(dst: Path, names=FILES) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(SHARED / n, dst / n)
        (dst / n).chmod(0o644)
    return dst


# --- token counts and verification of the shared files -------------------------------------

@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_shared_file_counts_and_checksums(name):
    split = name.split(".")[1]
    data = (SHARED / name).read_bytes()
    lines = bd.read_lines(data.decode("utf-8"))
    assert len(lines) == EXPECTED_LINES[split]
    assert bd.count_tokens(lines) == EXPECTED_TOKENS[split]
    # the same convention written out differently: words + one <eos> per newline
    text = data.decode("utf-8")
    assert len(text.split()) + text.count("\n") == EXPECTED_TOKENS[split]
    known = bd.KNOWN_FILES[name]
    assert known.size == len(data)
    assert bd.verify_file(SHARED / name) == hashlib.sha256(data).hexdigest() == known.sha256


@needs_shared
@pytest.mark.parametrize("variant", bd.VARIANTS)
def test_proxy_word_counts(variant):
    d = load_wikitext2(SHARED, variant=variant, scheme="proxy")
    assert d.train.dtype == torch.long and d.train.dim() == 1
    assert d.train.numel() == EXPECTED_TOKENS["valid"]
    assert d.valid.numel() + d.test.numel() == EXPECTED_TOKENS["test"]
    assert d.valid.numel() > 0 and d.test.numel() > 0
    assert d.scheme == "proxy" and d.variant == variant and d.tokenizer == "word"
    assert d.source == "data_dir" and Path(d.data_dir) == SHARED
    assert d.checksums == {n: bd.KNOWN_FILES[n].sha256
                           for n in (f"wiki.valid.{variant}", f"wiki.test.{variant}")}
    info = d.to_dict()
    json.dumps(info)  # JSON-ready, no tensors
    assert info["scheme"] == "proxy" and info["num_tokens"]["train"] == EXPECTED_TOKENS["valid"]
    assert "wiki.valid." + variant in d.split_sources["train"]
    assert "proxy" in d.describe()


# --- the proxy split --------------------------------------------------------------------------

def _independent_cut(text: str) -> int:
    """Character offset of the top-level heading nearest the middle (in words + newlines)."""
    total = len(text.split()) + text.count("\n")
    headings = list(re.finditer(r"^ = (?!=)[^\n]*(?<!=) = $", text, flags=re.MULTILINE))
    best = None
    for m in headings[1:]:  # cutting at the first heading would leave no validation part
        before = text[:m.start()]
        dist = abs(len(before.split()) + before.count("\n") - total / 2)
        if best is None or dist < best[0]:  # strict: the earlier of two equally near wins
            best = (dist, m.start())
    return best[1]


@needs_shared
@pytest.mark.parametrize("variant", bd.VARIANTS)
def test_proxy_split_point(variant):
    text = _text(f"wiki.test.{variant}")
    cut = _independent_cut(text)
    head, tail = text[:cut], text[cut:]
    d = load_wikitext2(SHARED, variant=variant, scheme="proxy")
    assert d.valid.numel() == len(head.split()) + head.count("\n")
    assert d.test.numel() == len(tail.split()) + tail.count("\n")
    # the validation part ends with a complete line; the test part starts at an article heading
    assert d.valid[-1].item() == d.vocab.eos_id
    first_line = tail.split("\n", 1)[0]
    assert bd.is_article_heading(first_line)
    assert d.vocab.decode(d.test[:len(first_line.split()) + 1]).split() == first_line.split()
    # the module's own function agrees, and the line is the same for both forms
    lines = bd.read_lines(text)
    k = bd.proxy_split_line(lines)
    assert k == head.count("\n")
    other = "raw" if variant == "tokens" else "tokens"
    assert bd.proxy_split_line(bd.read_lines(_text(f"wiki.test.{other}"))) == k
    assert f"lines 1-{k:,} of" in d.split_sources["valid"]
    assert f"lines {k + 1:,}-" in d.split_sources["test"]


def test_article_headings():
    assert bd.is_article_heading(" = Robert Boulter = ")
    assert bd.is_article_heading(" = A = ")
    assert not bd.is_article_heading(" = = Career = = ")
    assert not bd.is_article_heading(" = = = 2000 – 2005 = = = ")
    assert not bd.is_article_heading(" ")
    assert not bd.is_article_heading("= Title =")
    assert not bd.is_article_heading(" The = sign = ")


def test_proxy_split_nearest_boundary_synthetic():
    # articles of 1+10, 1+2, 1+2, 1+10 lines of one word each: 2 tokens per line, total 52
    # tokens; boundaries after 22, 28, 34 tokens -> 28 is nearest to 26
    lines = []
    for body in (10, 2, 2, 10):
        lines.append(" = T = ")  # heading: "=", "T", "=" + <eos> = 4 tokens, same for all
        lines += ["w"] * body
    counts = [len(x.split()) + 1 for x in lines]
    starts = [sum(counts[:i]) for i, x in enumerate(lines) if bd.is_article_heading(x)]
    k = bd.proxy_split_line(lines)
    assert bd.is_article_heading(lines[k])
    best = min(starts[1:], key=lambda s: abs(2 * s - sum(counts)))
    assert sum(counts[:k]) == best
    with pytest.raises(DataError, match="heading"):
        bd.proxy_split_line(["no heading here"])


# --- vocabulary and <unk> -----------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("variant", bd.VARIANTS)
def test_vocab_from_training_split_and_unk(variant):
    d = load_wikitext2(SHARED, variant=variant, scheme="proxy")
    train_lines = bd.read_lines(_text(f"wiki.valid.{variant}"))
    train_words = [w for line in train_lines for w in line.split() + [bd.EOS]]
    expected = list(dict.fromkeys(train_words))
    if bd.UNK not in expected:
        expected.append(bd.UNK)
    assert d.vocab.itos == expected  # first-occurrence order, built on the proxy train split
    assert d.vocab.itos[0] == bd.EOS == d.vocab.itos[d.vocab.eos_id]
    assert d.vocab.itos[d.vocab.unk_id] == bd.UNK
    assert len(d.vocab) == len(expected)
    # train round-trips exactly (word by word)
    assert [x.split() for x in bd.read_lines(d.vocab.decode(d.train))] == \
           [x.split() for x in train_lines]
    # out-of-vocabulary words of valid/test map to <unk>, and are counted
    known = set(expected)
    test_text = _text(f"wiki.test.{variant}")
    test_words = [w for line in bd.read_lines(test_text) for w in line.split() + [bd.EOS]]
    oov_total = sum(w not in known for w in test_words)
    assert oov_total > 0
    assert d.oov_counts["train"] == 0
    assert d.oov_counts["valid"] + d.oov_counts["test"] == oov_total
    ids = torch.cat([d.valid, d.test])
    expected_ids = torch.tensor([d.vocab.stoi.get(w, d.vocab.unk_id) for w in test_words])
    assert torch.equal(ids, expected_ids)
    literal_unk = sum(w == bd.UNK for w in test_words)
    assert int((ids == d.vocab.unk_id).sum()) == oov_total + literal_unk \
        == d.unk_counts["valid"] + d.unk_counts["test"]
    assert int(ids.max()) < len(d.vocab) and int(ids.min()) >= 0


def test_vocab_encode_decode():
    v = bd.Vocab.from_words(["a", "b", bd.EOS, "a"])
    assert v.itos == ["a", "b", bd.EOS, bd.UNK]
    assert v.encode("a b\nzzz\n") == [0, 1, 2, 3, 2]
    assert v.decode([0, 1, 2, 0]) == "a b\na"
    b = bd.Vocab.byte_level()
    assert len(b) == 256 and b.eos_id == 0x0A and b.unk_id is None
    assert b.encode("é\nx") == [0xC3, 0xA9, 0x0A, ord("x"), 0x0A]
    assert b.decode(b.encode("é\nx\n")) == "é\nx\n"


# --- byte tokenizer -------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("variant", bd.VARIANTS)
def test_byte_tokenizer_counts(variant):
    d = load_wikitext2(SHARED, variant=variant, scheme="proxy", tokenizer="byte")
    valid_bytes = (SHARED / f"wiki.valid.{variant}").read_bytes()
    test_bytes = (SHARED / f"wiki.test.{variant}").read_bytes()
    assert len(d.vocab) == 256 and d.vocab.eos_id == 0x0A
    # every line's UTF-8 bytes + one newline: exactly the file's bytes (files end with "\n")
    assert d.train.numel() == len(valid_bytes) == d.num_bytes["train"]
    assert bytes(d.train.tolist()) == valid_bytes
    assert d.valid.numel() + d.test.numel() == len(test_bytes)
    assert bytes(torch.cat([d.valid, d.test]).tolist()) == test_bytes
    assert d.num_bytes == {s: getattr(d, s).numel() for s in bd.SPLITS}
    assert d.oov_counts == {"train": 0, "valid": 0, "test": 0}
    # same cut as the word tokenizer
    w = load_wikitext2(SHARED, variant=variant, scheme="proxy")
    assert w.num_bytes == d.num_bytes and w.split_sources == d.split_sources
    assert bytes(d.test[:3].tolist()) == b" = "


# --- verification failures ------------------------------------------------------------------

@needs_shared
def test_truncated_copy_is_an_error(tmp_path):
    d = _copy(tmp_path / "data")
    data = (SHARED / "wiki.test.tokens").read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1  # drop the last line: still well-formed text
    (d / "wiki.test.tokens").write_bytes(data[:cut])
    with pytest.raises(DataError) as err:
        load_wikitext2(d, scheme="proxy")
    msg = str(err.value)
    assert "wiki.test.tokens" in msg and "1,256,449" in msg and f"{cut:,}" in msg
    assert "truncated or altered" in msg
    # the other form in the same folder is untouched and still loads
    assert load_wikitext2(d, variant="raw", scheme="proxy").valid.numel() > 0


@needs_shared
def test_altered_same_size_copy_is_an_error(tmp_path):
    d = _copy(tmp_path / "data")
    data = bytearray((SHARED / "wiki.valid.raw").read_bytes())
    i = data.index(b"lobster")
    data[i:i + 7] = b"lobstar"
    (d / "wiki.valid.raw").write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_wikitext2(d, variant="raw", scheme="proxy")
    msg = str(err.value)
    assert "wiki.valid.raw" in msg and "sha256" in msg
    assert bd.KNOWN_FILES["wiki.valid.raw"].sha256 in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg


@needs_shared
def test_damaged_cache_entry_says_delete_it(tmp_path):
    cache = _copy(tmp_path / "cache", ("wiki.valid.tokens", "wiki.test.tokens"))
    (cache / "wiki.valid.tokens").write_bytes(b" \n = Short = \n")
    with pytest.raises(DataError, match="Delete the cache entry"):
        load_wikitext2(scheme="proxy", cache_dir=cache)


# --- a synthetic train split of the published shape --------------------------------------------

def _synthetic_train(path: Path, drop_one_word: bool = False) -> None:
    """A file with the published train figures: 36,718 lines, 2,088,628 tokens, 33,278 vocab."""
    known = bd.KNOWN_FILES["wiki.train.tokens"]
    n_lines, n_words, n_distinct = known.lines, known.tokens - known.lines, known.vocab - 1
    distinct = [f"w{i}" for i in range(n_distinct - 1)] + [bd.UNK]
    per_line, extra = divmod(n_words, n_lines)
    lines, k = [], 0
    for i in range(n_lines):
        n = per_line + (1 if i < extra else 0)
        lines.append(" " + " ".join(distinct[(k + j) % n_distinct] for j in range(n)) + " ")
        k += n
    if drop_one_word:
        lines[5] = lines[5].split(" ", 2)[2]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@needs_shared
def test_a_fabricated_train_file_of_the_published_shape_is_refused(tmp_path):
    d = _copy(tmp_path / "data", ("wiki.valid.tokens", "wiki.test.tokens"))
    _synthetic_train(d / "wiki.train.tokens")
    with pytest.raises(DataError, match="expected SHA-1 863f29c46ef9d167fff4940ec821195882fe29d1"):
        load_wikitext2(d)


@needs_shared
def test_official_scheme_with_a_train_file_of_the_published_shape(tmp_path, monkeypatch):
    d = _copy(tmp_path / "data", ("wiki.valid.tokens", "wiki.test.tokens"))
    train = d / "wiki.train.tokens"
    _synthetic_train(train)
    # stand in for the real file: the synthetic one's digest replaces the release's
    known = bd.KNOWN_FILES["wiki.train.tokens"]
    sha1 = hashlib.sha1(train.read_bytes()).hexdigest()
    monkeypatch.setitem(bd.KNOWN_FILES, "wiki.train.tokens", dataclasses.replace(known, sha1=sha1))
    data = load_wikitext2(d)
    assert data.scheme == "official"
    assert data.train.numel() == 2_088_628
    assert len(data.vocab) == 33_278
    assert data.valid.numel() == EXPECTED_TOKENS["valid"]
    assert data.test.numel() == EXPECTED_TOKENS["test"]
    assert set(data.checksums) == {"wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"}
    assert data.verification["wiki.train.tokens"] == "lines+tokens+vocab+sha1"
    assert data.verification["wiki.valid.tokens"] == "size+sha256"
    _synthetic_train(train, drop_one_word=True)
    with pytest.raises(DataError, match="token count of 2,088,628, found 2,088,627"):
        load_wikitext2(d)


# SHA-1 of the release's files as GluonNLP's WikiText2 / WikiText2Raw definitions publish them;
# the train values in KNOWN_FILES come from the same definitions
PUBLISHED_SHA1 = {
    "wiki.valid.tokens": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
    "wiki.test.tokens": "c7b8ce0aa086fb34dab808c5c49224211eb2b172",
    "wiki.valid.raw": "db78d4db83700cba1b1bf4a9381087043db2876d",
    "wiki.test.raw": "6f1fe2054a940eebfc76b284b09680763b37f5ea",
}


@needs_shared
@pytest.mark.parametrize("name", sorted(PUBLISHED_SHA1))
def test_the_published_sha1_list_describes_this_release(name):
    """The list the train digests come from matches the validation and test files we hold."""
    assert hashlib.sha1((SHARED / name).read_bytes()).hexdigest() == PUBLISHED_SHA1[name]
    assert bd.KNOWN_FILES["wiki.train.tokens"].sha1 == "863f29c46ef9d167fff4940ec821195882fe29d1"
    assert bd.KNOWN_FILES["wiki.train.raw"].sha1 == "d33faf256327882db0edc7c67cd098d1051a2112"


# --- finding the files ------------------------------------------------------------------------

def test_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_wikitext2(tmp_path / "nowhere", scheme="proxy")
    monkeypatch.setenv(bd.ENV_DATA_DIR, str(tmp_path / "nowhere-either"))
    with pytest.raises(DataError, match="BKBENCH_DATA_DIR.*does not exist"):
        load_wikitext2(scheme="proxy")


@needs_shared
def test_env_data_dir_is_used(monkeypatch):
    monkeypatch.setenv(bd.ENV_DATA_DIR, str(SHARED))
    d = load_wikitext2(scheme="proxy")
    assert d.source == "env" and Path(d.data_dir) == SHARED


@needs_shared
def test_official_without_train_mentions_proxy():
    with pytest.raises(DataError) as err:
        load_wikitext2(SHARED, scheme="official")
    msg = str(err.value)
    assert "--split-scheme proxy" in msg and "wiki.train.tokens" in msg


@pytest.mark.parametrize("kwargs, allowed", [
    ({"variant": "txt"}, ("'tokens'", "'raw'")),
    ({"scheme": "random"}, ("'official'", "'proxy'")),
    ({"tokenizer": "bpe"}, ("'word'", "'byte'")),
])
def test_bad_arguments(kwargs, allowed):
    with pytest.raises(ValueError) as err:
        load_wikitext2(**kwargs)
    assert all(a in str(err.value) for a in allowed)


def test_offline_error_lists_files_dirs_and_remedies(tmp_path):
    cache = tmp_path / "empty-cache"
    with pytest.raises(DataError) as err:
        load_wikitext2(cache_dir=cache)
    msg = str(err.value)
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        assert name in msg
    assert str(cache) in msg
    assert "--data-dir" in msg and "BKBENCH_DATA_DIR" in msg and "cache" in msg
    assert "Salesforce/wikitext" in msg and "ConnectionError" in msg
    # nothing local and downloads forbidden: the same kind of message
    with pytest.raises(DataError, match="wiki.valid.raw.*--data-dir"):
        load_wikitext2(variant="raw", scheme="proxy", cache_dir=cache, download=False)


@needs_shared
def test_offline_with_only_train_missing_mentions_proxy(tmp_path):
    cache = _copy(tmp_path / "cache", ("wiki.valid.raw", "wiki.test.raw"))
    with pytest.raises(DataError) as err:
        load_wikitext2(variant="raw", cache_dir=cache)
    msg = str(err.value)
    assert "--split-scheme proxy" in msg and "missing wiki.train.raw." in msg
    assert load_wikitext2(variant="raw", scheme="proxy", cache_dir=cache).source == "cache"


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv(bd.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert bd.default_cache_dir() == tmp_path / "c" / "wikitext-2"
    monkeypatch.delenv(bd.ENV_CACHE_DIR)
    assert bd.default_cache_dir() == Path.home() / ".cache" / "bkbench" / "wikitext-2"


# --- the download path, with a fake Hub ------------------------------------------------------------

def _hf_parquet(text: str, path: Path) -> Path:
    """A parquet file shaped like the Hub's: one row per line, "\\n" kept, blank lines as ""."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [line + "\n" if line.strip() else "" for line in bd.read_lines(text)]
    pq.write_table(pa.table({"text": rows}), path)
    return path


class FakeHub:
    def __init__(self, root: Path, texts: dict[str, str]):
        self.root, self.texts, self.calls = root, texts, []

    def __call__(self, repo_id, filename, repo_type=None, **kwargs):
        self.calls.append((repo_id, filename, repo_type))
        assert repo_id == "Salesforce/wikitext" and repo_type == "dataset"
        if filename not in self.texts:
            raise FileNotFoundError(f"404: {filename}")
        self.root.mkdir(parents=True, exist_ok=True)
        return str(_hf_parquet(self.texts[filename], self.root / filename.replace("/", "__")))


@needs_shared
@pytest.mark.parametrize("variant, config", [("tokens", "wikitext-2-v1"),
                                             ("raw", "wikitext-2-raw-v1")])
def test_download_and_convert(tmp_path, monkeypatch, variant, config):
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub", {
        f"{config}/validation-00000-of-00001.parquet": _text(f"wiki.valid.{variant}"),
        f"{config}/test-00000-of-00001.parquet": _text(f"wiki.test.{variant}"),
    })
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    cache = tmp_path / "cache"
    d = load_wikitext2(variant=variant, scheme="proxy", cache_dir=cache)
    assert d.source == "download" and Path(d.data_dir) == cache
    assert sorted(f for _, f, _ in hub.calls) == sorted(hub.texts)
    for split in ("valid", "test"):
        name = f"wiki.{split}.{variant}"
        assert (cache / name).read_bytes() == (SHARED / name).read_bytes()
        assert d.checksums[name] == bd.KNOWN_FILES[name].sha256
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"wiki.valid.{variant}", f"wiki.test.{variant}"])  # no temporary files left
    # second time: from the cache, the Hub is not asked
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _hub_unreachable)
    again = load_wikitext2(variant=variant, scheme="proxy", cache_dir=cache)
    assert again.source == "cache" and torch.equal(again.test, d.test)
    # the official scheme needs train, which this fake Hub does not have
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(DataError, match="split-scheme proxy"):
        load_wikitext2(variant=variant, cache_dir=cache)
    assert any(f == f"{config}/train-00000-of-00001.parquet" for _, f, _ in hub.calls)


@needs_shared
def test_download_that_does_not_verify_is_not_saved(tmp_path, monkeypatch):
    import huggingface_hub

    altered = _text("wiki.valid.tokens").replace("lobster", "lobstar", 1)
    hub = FakeHub(tmp_path / "hub", {
        "wikitext-2-v1/validation-00000-of-00001.parquet": altered,
        "wikitext-2-v1/test-00000-of-00001.parquet": _text("wiki.test.tokens"),
        "wikitext-2-v1/train-00000-of-00001.parquet": " = Tiny = \n some words \n",
    })
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        load_wikitext2(scheme="proxy", cache_dir=cache)
    assert "wiki.valid.tokens" in str(err.value) and "sha256" in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())
    # a train split that is not the official one is refused too (by line count)
    with pytest.raises(DataError, match="line count of 36,718, found 2"):
        load_wikitext2(scheme="official", cache_dir=cache)
    assert not (cache / "wiki.train.tokens").exists()
