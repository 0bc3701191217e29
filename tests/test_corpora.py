"""Tests of bkbench.corpora and bkbench.token_cache on small synthetic corpora laid out like each
release (file names, headers, line conventions, the single-file byte splits).

The published facts (digests, line counts, sizes) describe the real files, which are far too big
for tests; each test replaces them by the same kinds of facts computed from its synthetic files,
so the checks run exactly as on the real release.  No test touches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import bkbench.corpora as bc
import bkbench.token_cache as tc
from bkbench.config import BenchmarkConfig, ConfigError
from bkbench.data import EOS, DataError, load_wikitext2
from bkbench.eval import bits_per_byte, word_perplexity

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
needs_shared = pytest.mark.skipif(not (SHARED / "wiki.test.tokens").is_file(),
                                  reason=f"the shared WikiText-2 files are not in {SHARED}")
WORDS = ("the of and in to a was is for on as with by he at from his it an were are which "
         "this be also or had first one their its new after but who not they have").split()


def _hub_unreachable(*args, **kwargs):
    raise ConnectionError("no network in tests")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv(bc.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv(bc.ENV_CACHE_DIR, str(tmp_path / "cache-root"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _hub_unreachable)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", _hub_unreachable)


# --- synthetic releases ------------------------------------------------------------------------

def _wikitext_text(seed: int, articles: int = 6, unk: bool = True) -> str:
    rng = random.Random(seed)
    vocab = WORDS + (["<unk>"] if unk else ["Zürich", "naïve"]) + [f"w{seed}_{i}" for i in range(5)]
    lines = [" "]
    for a in range(articles):
        lines += [f" = Article {seed} {a} = ", " "]
        for _ in range(3):
            lines += [" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 25))) + " ",
                      " "]
        lines += [" = = Section = = ", " "]
    return "\n".join(lines) + "\n"


def _ptb_text(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    vocab = WORDS + ["<unk>", "N"]
    return "".join(" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 20))) + " \n"
                   for _ in range(n))


def _text8_bytes(n_words: int = 3000) -> bytes:
    rng = random.Random(8)
    return (" " + " ".join(rng.choice(WORDS) for _ in range(n_words))).encode()


def _enwik8_bytes() -> bytes:
    rng = random.Random(9)
    body = "".join(f"    <page>\n      <title>Page {i} – café</title>\n      <text>"
                   + " ".join(rng.choice(WORDS) for _ in range(30)) + " ü ß</text>\n    </page>\n"
                   for i in range(60))
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/">\n' + body).encode()


def _facts(path: Path, **kinds) -> bc.FileFacts:
    """The facts of the kinds a release publishes (``lines=True, sha1=True`` ...) of ``path``."""
    data = path.read_bytes()
    values = {"size": len(data), "lines": data.count(b"\n"),
              "sha256": hashlib.sha256(data).hexdigest(), "sha1": hashlib.sha1(data).hexdigest(),
              "md5": hashlib.md5(data).hexdigest(), "distinct_bytes": len(set(data)),
              "header": data[:11]}
    return bc.FileFacts(path.name, **{k: values[k] for k, on in kinds.items() if on})


def make_release(name: str, root: Path, monkeypatch) -> Path:
    """Write a synthetic ``name`` release into ``root/name`` and make its facts the published ones."""
    folder = root / name
    folder.mkdir(parents=True)
    if name == "wikitext-103":
        for i, s in enumerate(("train", "valid", "test")):
            (folder / f"wiki.{s}.tokens").write_text(_wikitext_text(i, 12 if s == "train" else 4))
        monkeypatch.setattr(bc, "_WT103_FACTS", {p.name: _facts(p, lines=True, sha1=True)
                                                 for p in folder.iterdir()})
    elif name == "ptb":
        for i, s in enumerate(("train", "valid", "test")):
            (folder / f"ptb.{s}.txt").write_text(_ptb_text(i, 80 if s == "train" else 20))
        monkeypatch.setattr(bc, "_PTB_FACTS", {p.name: _facts(p, lines=True, md5=True)
                                               for p in folder.iterdir()})
    elif name in ("text8", "enwik8"):
        data = _text8_bytes() if name == "text8" else _enwik8_bytes()
        (folder / name).write_bytes(data)
        n = len(data)
        monkeypatch.setattr(bc, "_HUTTER_SPLIT", (n * 9 // 10, n * 19 // 20))
        kinds = (dict(size=True, sha1=True) if name == "text8"
                 else dict(size=True, distinct_bytes=True, header=True, sha1=True, md5=True))
        monkeypatch.setattr(bc, f"_{name.upper()}_FACTS", {name: _facts(folder / name, **kinds)})
    elif name == "dir":
        for i, s in enumerate(("train", "valid", "test")):
            (folder / f"{s}.txt").write_text(_wikitext_text(10 + i, 3, unk=False))
    return folder


def _reference_words(text: str, by_lines: bool) -> list[str]:
    if not by_lines:
        return text.split()
    return [w for line in text.split("\n")[:-1] for w in line.split() + [EOS]]


def _split_texts(name: str, folder: Path) -> dict[str, bytes]:
    if name in ("text8", "enwik8"):
        data = (folder / name).read_bytes()
        a, b = bc._HUTTER_SPLIT
        return {"train": data[:a], "valid": data[a:b], "test": data[b:]}
    release = bc.release_for(name if name != "dir" else f"dir:{folder}")
    return {s: (folder / release.files[s]).read_bytes() for s in ("train", "valid", "test")}


def _load(name, folder, tokenizer="word", **kw):
    dataset = f"dir:{folder}" if name == "dir" else name
    return tc.load_corpus(dataset, tokenizer=tokenizer,
                          data_dir=None if name == "dir" else folder, **kw)


# --- loaders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["wikitext-103", "ptb", "text8", "dir"])
def test_word_ids_match_an_independent_reference(tmp_path, monkeypatch, name):
    folder = make_release(name, tmp_path, monkeypatch)
    d = _load(name, folder)
    by_lines = name != "text8"
    texts = {s: t.decode() for s, t in _split_texts(name, folder).items()}
    words = {s: _reference_words(t, by_lines) for s, t in texts.items()}
    itos = list(dict.fromkeys(words["train"]))
    itos += [t for t in (EOS, "<unk>") if t not in itos]
    assert d.vocab.itos == itos
    for s in ("train", "valid", "test"):
        expected = [d.vocab.stoi.get(w, d.vocab.unk_id) for w in words[s]]
        assert getattr(d, s).tolist() == expected
        assert d.oov_counts[s] == sum(w not in d.vocab.stoi for w in words[s])
        assert d.num_bytes[s] == len(texts[s].encode())
        assert d.num_words[s] == len(words[s])
    assert d.dataset == (f"dir:{folder}" if name == "dir" else name)
    assert d.to_dict()["dataset"] == d.dataset


@pytest.mark.parametrize("name", ["text8", "enwik8", "ptb"])
def test_byte_ids_are_the_split_bytes(tmp_path, monkeypatch, name):
    folder = make_release(name, tmp_path, monkeypatch)
    d = _load(name, folder, "byte")
    for s, data in _split_texts(name, folder).items():
        assert bytes(getattr(d, s).to(torch.uint8).tolist()) == data
        assert d.num_bytes[s] == len(data)
    if name != "text8":
        return
    a, b = bc._HUTTER_SPLIT   # the customary split: 90%/5%/5% of the single file
    assert (d.num_tokens["train"], d.num_tokens["valid"]) == (a, b - a)


def test_enwik8_cut_inside_a_utf8_character_is_read_as_bytes(tmp_path, monkeypatch):
    folder = make_release("enwik8", tmp_path, monkeypatch)
    data = (folder / "enwik8").read_bytes()
    cut = data.index("–".encode()) + 1          # inside the three bytes of an en dash
    monkeypatch.setattr(bc, "_HUTTER_SPLIT", (cut, cut + 100))
    d = tc.load_corpus("enwik8", tokenizer="byte", data_dir=folder)
    assert bytes(d.valid.to(torch.uint8).tolist()) == data[cut:cut + 100]
    with pytest.raises(ValueError, match="byte tokenizer only"):
        tc.load_corpus("enwik8", tokenizer="word", data_dir=folder)


# --- verification ------------------------------------------------------------------------------

ALTERED = {"wikitext-103": ("wiki.train.tokens", "sha1"), "ptb": ("ptb.valid.txt", "md5"),
           "text8": ("text8", "sha1"), "enwik8": ("enwik8", "distinct byte values")}
TRUNCATED = {"wikitext-103": ("wiki.test.tokens", "line count"),
             "ptb": ("ptb.train.txt", "line count"), "text8": ("text8", "size"),
             "enwik8": ("enwik8", "size")}


@pytest.mark.parametrize("name", sorted(ALTERED))
def test_an_altered_file_is_refused(tmp_path, monkeypatch, name):
    folder = make_release(name, tmp_path, monkeypatch)
    file, fact = ALTERED[name]
    data = bytearray((folder / file).read_bytes())
    data[len(data) // 2] = 0x07 if name == "enwik8" else ord("q")   # same size, same lines
    (folder / file).write_bytes(bytes(data))
    with pytest.raises(DataError, match=fact) as err:
        _load(name, folder, "byte")
    assert file in str(err.value) and "altered" in str(err.value)


@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_a_truncated_file_is_refused(tmp_path, monkeypatch, name):
    folder = make_release(name, tmp_path, monkeypatch)
    file, fact = TRUNCATED[name]
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[:data.rindex(b"\n", 0, len(data) - 1) + 1]
                                if b"\n" in data[:-1] else data[:-100])
    with pytest.raises(DataError, match=f"expected a {fact}"):
        _load(name, folder, "byte")


def test_a_header_that_is_not_mediawiki_is_refused(tmp_path, monkeypatch):
    folder = make_release("enwik8", tmp_path, monkeypatch)
    data = (folder / "enwik8").read_bytes()
    (folder / "enwik8").write_bytes(b"<mediawikx" + data[10:])
    with pytest.raises(DataError, match="to start with"):
        tc.load_corpus("enwik8", tokenizer="byte", data_dir=folder)


def test_missing_files_and_no_download(tmp_path, monkeypatch):
    folder = make_release("ptb", tmp_path, monkeypatch)
    (folder / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match="ptb.test.txt"):
        tc.load_corpus("ptb", data_dir=folder)
    with pytest.raises(DataError, match="not downloaded automatically"):
        tc.load_corpus("text8")   # empty cache, and text8 has no verifiable Hub copy
    with pytest.raises(DataError, match="lacks valid.txt"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "train.txt").write_text("a b\n")
        tc.load_corpus(f"dir:{tmp_path / 'd'}")


def test_bad_dataset_tokenizer_and_scheme_choices():
    with pytest.raises(ValueError, match="dataset must be one of"):
        bc.release_for("wikitext-4")
    with pytest.raises(ValueError, match="raw' exists only"):
        bc.release_for("ptb", "raw")
    for bad in ("bpe", "bpe:0", "bpe:12", "bpe:x", "char"):
        with pytest.raises(ValueError, match="bpe:N"):
            tc.parse_tokenizer(bad)
    assert tc.parse_tokenizer("bpe:8192") == ("bpe", 8192)
    for fields, msg in [({"dataset": "wt2"}, "dataset must be"),
                        ({"tokenizer": "bpe:7"}, "bpe:N"),
                        ({"dataset": "enwik8", "tokenizer": "word"}, "byte tokenizer only"),
                        ({"dataset": "ptb", "split_scheme": "proxy"}, "only for wikitext-2")]:
        with pytest.raises(ConfigError, match=msg):
            BenchmarkConfig(**fields).validate()


# --- the Hub ---------------------------------------------------------------------------------

def _parquet_shards(tmp_path, text: str, n: int) -> dict[str, str]:
    """``text``'s lines as the Hub stores them (rows with their newline, blank lines ""), in
    ``n`` parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["" if not line.strip() else line for line in io.StringIO(text)]
    size = -(-len(rows) // n)
    out = {}
    for k in range(n):
        name = f"wikitext-103-v1/train-{k:05d}-of-{n:05d}.parquet"
        path = tmp_path / name.replace("/", "_")
        pq.write_table(pa.table({"text": rows[k * size:(k + 1) * size]}), path)
        out[name] = str(path)
    return out


def test_download_from_the_hub_is_verified_before_it_is_kept(tmp_path, monkeypatch):
    import huggingface_hub

    staged = make_release("wikitext-103", tmp_path / "staged", monkeypatch)
    texts = {s: (staged / f"wiki.{s}.tokens").read_text() for s in ("train", "valid", "test")}
    shards = _parquet_shards(tmp_path, texts["train"], 2)
    for s, hub in (("valid", "validation"), ("test", "test")):
        path = tmp_path / f"{hub}.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["" if not line.strip() else line
                                          for line in io.StringIO(texts[s])]}), path)
        shards[f"wikitext-103-v1/{hub}-00000-of-00001.parquet"] = str(path)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: list(shards))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, repo_type: shards[filename])
    d = tc.load_corpus("wikitext-103")
    assert d.source == "download"
    cache = bc.cache_root() / "wikitext-103"
    assert (cache / "wiki.train.tokens").read_text() == texts["train"]
    # a Hub copy that does not verify is refused and not kept
    for f in cache.iterdir():
        f.unlink()
    monkeypatch.setitem(bc._WT103_FACTS, "wiki.train.tokens",
                        bc.FileFacts("wiki.train.tokens", sha1="0" * 40))
    with pytest.raises(DataError, match="not saved"):
        tc.load_corpus("wikitext-103")
    assert not (cache / "wiki.train.tokens").exists()


# --- the cache: identical to the in-memory reference, chunking, resume --------------------------

@needs_shared
@pytest.mark.parametrize("variant", ["tokens", "raw"])
@pytest.mark.parametrize("tokenizer", ["word", "byte"])
def test_cache_matches_the_in_memory_wikitext2_loader(variant, tokenizer):
    fast = tc.load_corpus("wikitext-2", variant, "proxy", tokenizer, data_dir=SHARED)
    ref = load_wikitext2(SHARED, variant, "proxy", tokenizer)
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(fast, s), getattr(ref, s))
    assert fast.vocab.itos == ref.vocab.itos
    assert (fast.num_bytes, fast.oov_counts, fast.unk_counts) == (ref.num_bytes, ref.oov_counts,
                                                                  ref.unk_counts)
    assert fast.num_words == {s: int(getattr(load_wikitext2(SHARED, variant, "proxy"), s).numel())
                              for s in ("train", "valid", "test")}


@pytest.mark.parametrize("name,tokenizer", [("wikitext-103", "word"), ("text8", "word"),
                                            ("ptb", "byte"), ("wikitext-103", "bpe:300"),
                                            ("text8", "bpe:300")])
def test_ids_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch, name, tokenizer):
    folder = make_release(name, tmp_path, monkeypatch)
    whole = _load(name, folder, tokenizer)
    monkeypatch.setenv(bc.ENV_CACHE_DIR, str(tmp_path / "other-cache"))
    monkeypatch.setattr(tc, "TEXT_CHUNK", 37)   # many chunks, most cut mid-line
    chunked = _load(name, folder, tokenizer)
    assert whole.token_cache != chunked.token_cache
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(whole, s), getattr(chunked, s))
    assert whole.num_words == chunked.num_words


def _chunk_count(folder: Path, split: str) -> int:
    sources = bc.split_sources(bc.release_for("wikitext-103"), "official",
                               {p.name: (p, "") for p in folder.iterdir()})
    return sum(1 for _ in tc.iter_chunks(sources[split], True))


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    folder = make_release("wikitext-103", tmp_path, monkeypatch)
    reference = _load("wikitext-103", folder)
    monkeypatch.setenv(bc.ENV_CACHE_DIR, str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(tc, "TEXT_CHUNK", 200)
    encode, calls = tc._Encoder.encode, []

    def stopping(self, data, where):
        if len(calls) == 4:
            raise KeyboardInterrupt   # the fifth chunk of train is never written
        calls.append(len(data))
        return encode(self, data, where)

    monkeypatch.setattr(tc._Encoder, "encode", stopping)
    with pytest.raises(KeyboardInterrupt):
        _load("wikitext-103", folder)
    entry = next((tmp_path / "fresh-cache" / "tokens" / "wikitext-103").iterdir())
    state = json.loads((entry / "train.progress.json").read_text())
    assert state["offset"] == sum(calls)
    assert (entry / "train.ids.partial").stat().st_size == 8 * state["tokens"]

    def counting(self, data, where):
        calls.append(len(data))
        return encode(self, data, where)

    calls.clear()
    monkeypatch.setattr(tc._Encoder, "encode", counting)
    resumed = _load("wikitext-103", folder)
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(resumed, s), getattr(reference, s))
    assert resumed.num_words == reference.num_words
    # the four chunks written before the stop are not tokenized again
    assert len(calls) == sum(_chunk_count(folder, s) for s in ("train", "valid", "test")) - 4
    assert not (entry / "train.progress.json").exists()


def test_a_complete_entry_is_reused_and_memory_mapped(tmp_path, monkeypatch):
    folder = make_release("ptb", tmp_path, monkeypatch)
    first = tc.load_corpus("ptb", data_dir=folder)
    monkeypatch.setattr(tc._Encoder, "encode", lambda *a: pytest.fail("re-tokenized"))
    again = tc.load_corpus("ptb", data_dir=folder)
    assert torch.equal(first.train, again.train)
    ids_file = Path(again.token_cache) / "train.ids"
    assert ids_file.stat().st_size == 8 * again.train.numel()
    on_disk = np.memmap(ids_file, dtype="<i8", mode="r")
    assert np.array_equal(on_disk, again.train.numpy())


# --- BPE and the cross-tokenizer units ----------------------------------------------------------

def test_bpe_is_lossless_and_of_the_asked_size(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    folder = make_release("dir", tmp_path, monkeypatch)
    d = tc.load_corpus(f"dir:{folder}", tokenizer="bpe:300")
    tok = Tokenizer.from_file(str(Path(d.token_cache) / "tokenizer.json"))
    assert len(d.vocab) == tok.get_vocab_size() <= 300
    assert d.vocab.itos[d.vocab.eos_id] == "\u010a"
    for s in ("train", "valid", "test"):
        text = (folder / f"{s}.txt").read_bytes()
        assert tok.decode(getattr(d, s).tolist()).encode() == text
        assert getattr(d, s).numel() < d.num_bytes[s]   # merges happened


def test_bits_per_byte_and_word_perplexity_against_oracles():
    nll = 1000.0
    assert bits_per_byte(nll, 500) == pytest.approx(nll / np.log(2) / 500)
    assert word_perplexity(nll, 250) == pytest.approx(np.exp(4.0))
    assert bits_per_byte(nll, 0) is None and word_perplexity(nll, None) is None


def test_units_section_puts_word_bpe_and_byte_runs_side_by_side():
    from types import SimpleNamespace

    from bkbench.experiments.data_section import units_section

    def run(name, tokenizer, vocab, ppl, word_ppl, bpt, bpb):
        return SimpleNamespace(model_name=name, config={"tokenizer": tokenizer},
                               data={"dataset": "wikitext-2", "vocab_size": vocab},
                               test_perplexity=ppl, test_word_perplexity=word_ppl,
                               test_bits_per_token=bpt, test_bits_per_byte=bpb)

    class Doc:
        def __init__(self):
            self.parts = []

        def h(self, level, text):
            self.parts.append(("h", text))

        def p(self, text):
            self.parts.append(("p", text))

        def table(self, headers, rows):
            self.parts.append(("table", headers, rows))

    doc = Doc()
    units_section(doc, [run("a", "word", 33278, 180.5, 180.5, 7.496, 1.601),
                        run("b", "bpe:8192", 8192, 40.25, None, 5.331, 1.587)])
    (_, headers, rows), = [p for p in doc.parts if p[0] == "table"]
    assert headers[-1] == "test bits / byte"
    assert rows == [["a", "wikitext-2", "word", "33,278", "180.50", "180.50", "7.496", "1.601"],
                    ["b", "wikitext-2", "bpe:8192", "8,192", "40.25", "n/a", "5.331", "1.587"]]
    empty = Doc()
    units_section(empty, [])
    assert empty.parts == []


def _load_ids(dataset: str) -> list[int]:
    return tc.load_corpus(dataset).train.tolist()


def test_two_processes_building_one_entry_get_the_same_ids(tmp_path, monkeypatch):
    import concurrent.futures
    import multiprocessing

    folder = make_release("dir", tmp_path, monkeypatch)
    with concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(_load_ids, [f"dir:{folder}"] * 2))
    monkeypatch.setenv(bc.ENV_CACHE_DIR, str(tmp_path / "fresh"))
    reference = _load_ids(f"dir:{folder}")
    assert got == [reference, reference]


def test_results_from_before_the_dataset_field_count_as_wikitext2_runs():
    from bkbench import runs
    from bkbench.config import build_run_configs

    (config,) = build_run_configs("smoke", {}, {}, ["transformer_baseline"])
    new = config.to_dict()
    old = {k: v for k, v in new.items() if k != "dataset"}
    assert runs.config_changes(old, new) == []
    assert runs.setup_of(old) == runs.setup_of(new)
    other = config.replace(dataset="ptb").to_dict()
    assert runs.config_changes(old, other) == [
        "dataset: finished run has 'wikitext-2', this one 'ptb'"]
    assert runs.setup_of(old) != runs.setup_of(other)
