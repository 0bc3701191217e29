"""Corpora by name: what each release publishes about its files, where they are found, how
they are verified and split (docs/data.md).

``--dataset`` is one of :data:`DATASETS` or ``dir:PATH``.  A dataset is a :class:`Release`: the
files of its splits, the facts its publishers give about them (:class:`FileFacts`; every value
below names where it comes from) and, for the single-file character corpora, the customary
90M/5M/5M byte split.  Files are looked for as WikiText-2's are (bkbench.data): an explicit
folder (``--data-dir`` / ``$BKBENCH_DATA_DIR``), else the cache ``$BKBENCH_CACHE_DIR/<dataset>``,
else a download from the Hugging Face Hub where the dataset is on it in a form the published
facts can verify.  Files are read in streaming fashion (WikiText-103's train file is 0.5 GB), so
verification holds one chunk in memory at a time.

What is verified
    size, line count, distinct byte values and leading bytes where published, then the digest the
    release's publisher gives (sha256, SHA-1 or MD5); the sha256 of every file used is returned for
    the results.  A mismatch raises :class:`~bkbench.data.DataError` naming the file, the fact and
    what to do; nothing is ever used from a file that failed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import write_bytes_atomic
from .data import (_PROXY_HINT, ENV_CACHE_DIR, ENV_DATA_DIR, KNOWN_FILES, SPLITS, DataError,
                   proxy_split_line, read_lines)

DATASETS = ("wikitext-2", "wikitext-103", "ptb", "enwik8", "text8")
DIR_PREFIX = "dir:"
CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class FileFacts:
    """Published facts about one release file; ``None`` means "not published, not checked"."""

    name: str
    size: int | None = None
    lines: int | None = None           # count of "\n"
    sha256: str | None = None
    sha1: str | None = None
    md5: str | None = None
    distinct_bytes: int | None = None  # number of different byte values in the file
    header: bytes | None = None        # the file starts with these bytes

    @property
    def method(self) -> str:
        checks = [("size", self.size), ("lines", self.lines), ("distinct-bytes", self.distinct_bytes),
                  ("header", self.header), ("sha256", self.sha256), ("sha1", self.sha1),
                  ("md5", self.md5)]
        done = [name for name, value in checks if value is not None]
        return "+".join(done) if done else "none (no published facts; sha256 recorded)"


@dataclass(frozen=True)
class Release:
    """One dataset in one form: its split files and how the splits are cut from them."""

    name: str
    files: dict[str, str]                      # split -> file name (one name for all: one file)
    facts: dict[str, FileFacts] = field(default_factory=dict)
    byte_split: tuple[int, int] | None = None  # single-file corpora: (train end, valid end)
    tokenizers: tuple[str, ...] = ("word", "byte", "bpe")
    hub: Callable[[str], bytes] | None = None  # split -> the file's bytes, from the Hub
    hub_name: str = ""
    folder: str = ""                           # name of its cache folder

    @property
    def by_lines(self) -> bool:
        """Whether the text is lines ending in newlines (every corpus but enwik8/text8)."""
        return self.byte_split is None


# --------------------------------------------------------------------------------------------
# The releases and what is published about them
# --------------------------------------------------------------------------------------------

def _wikitext2_facts() -> dict[str, FileFacts]:
    return {n: FileFacts(n, size=k.size, lines=k.lines, sha256=k.sha256, sha1=k.sha1)
            for n, k in KNOWN_FILES.items()}


# WikiText-103: SHA-1 of each file from GluonNLP's WikiText103 / WikiText103Raw dataset
# definitions (dmlc/gluon-nlp, src/gluonnlp/data/corpora/wikitext.py); line counts of the
# tokenized files from torchtext's WikiText103 definition (NUM_LINES 1,801,350 / 3,760 / 4,358).
# The raw validation and test files are the WikiText-2 ones (GluonNLP gives them the same
# SHA-1, which the copies this project is tested with have), so their size and sha256 are known.
_WT103_FACTS = {
    "wiki.train.tokens": FileFacts("wiki.train.tokens", lines=1_801_350,
                                   sha1="b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
    "wiki.valid.tokens": FileFacts("wiki.valid.tokens", lines=3_760,
                                   sha1="c326ac59dc587676d58c422eb8a03e119582f92b"),
    "wiki.test.tokens": FileFacts("wiki.test.tokens", lines=4_358,
                                  sha1="8a5befc548865cec54ed4273cf87dbbad60d1e47"),
    "wiki.train.raw": FileFacts("wiki.train.raw", sha1="3d06627c15e834408cfee91293f862c11c1cc9ef"),
    "wiki.valid.raw": _wikitext2_facts()["wiki.valid.raw"],
    "wiki.test.raw": _wikitext2_facts()["wiki.test.raw"],
}

# Penn Treebank (Mikolov's preprocessing, the files of simple-examples/data): MD5 and line counts
# from torchtext's PennTreebank definition (pytorch/text, datasets/penntreebank.py).
_PTB_FACTS = {
    "ptb.train.txt": FileFacts("ptb.train.txt", lines=42_068, md5="f26c4b92c5fdc7b3f8c7cdcb991d8420"),
    "ptb.valid.txt": FileFacts("ptb.valid.txt", lines=3_370, md5="aa0affc06ff7c36e977d7cd49e3839bf"),
    "ptb.test.txt": FileFacts("ptb.test.txt", lines=3_761, md5="8b80168b89c18661a38ef683c0dc3721"),
}

# enwik8: the first 10^8 bytes of the English Wikipedia dump of 3 March 2006 (Hutter Prize / Large
# Text Compression Benchmark).  Size, MD5 and SHA-1 from the benchmark's table of its test files
# (mattmahoney.net/dc/text.html, quoted in GluonNLP's large_text_compression_benchmark.py); 205
# distinct byte values (NLP-progress, language_modeling.md) and the MediaWiki export header are
# checked first, as their messages say more than a digest's.
_ENWIK8_FACTS = {"enwik8": FileFacts("enwik8", size=100_000_000, distinct_bytes=205,
                                     header=b"<mediawiki ",
                                     sha1="57b8363b814821dc9d47aa4d41f58733519076b2",
                                     md5="a1fa5ffddb56f4953e226637dabbb36a")}

# text8: the first 10^8 characters of enwik9 after Matt Mahoney's cleaning; SHA-1 of the unzipped
# file from GluonNLP's Text8 definitions (dmlc/gluon-nlp, scripts/word_embeddings/data.py and
# src/gluonnlp/data/corpora/large_text_compression_benchmark.py).
_TEXT8_FACTS = {"text8": FileFacts("text8", size=100_000_000,
                                   sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de")}

# the customary character-level split (e.g. salesforce/awd-lstm-lm data/enwik8/prep_enwik8.py):
# first 90M bytes train, next 5M valid, last 5M test
_HUTTER_SPLIT = (90_000_000, 95_000_000)


def _wikitext_hub(config: str) -> Callable[[str], bytes]:
    def fetch(split: str) -> bytes:
        from .data import HF_REPO_ID, HF_SPLIT_NAMES
        return _hub_lines(HF_REPO_ID, config, HF_SPLIT_NAMES[split], "text",
                          lambda row: " \n" if not row.strip()
                          else (row if row.endswith("\n") else row + "\n"))
    return fetch


def _ptb_hub(split: str) -> bytes:
    # the Hub copy holds each line's words without the file's leading space and trailing " \n"
    names = {"train": "train", "valid": "validation", "test": "test"}
    return _hub_lines("ptb-text-only/ptb_text_only", "penn_treebank", names[split], "sentence",
                      lambda row: f" {row} \n")


def _hub_lines(repo: str, config: str, split: str, column: str,
               to_line: Callable[[str], str]) -> bytes:
    """Every parquet shard ``<config>/<split>-*.parquet`` of a Hub dataset, rows made lines."""
    import huggingface_hub
    import pyarrow.parquet as pq

    shards = sorted(f for f in huggingface_hub.list_repo_files(repo, repo_type="dataset")
                    if f.startswith(f"{config}/{split}-") and f.endswith(".parquet"))
    if not shards:
        raise FileNotFoundError(f"no {config}/{split}-*.parquet in {repo}")
    out: list[str] = []
    for shard in shards:
        local = huggingface_hub.hf_hub_download(repo_id=repo, filename=shard, repo_type="dataset")
        out.extend(to_line(row or "") for row in pq.read_table(local, columns=[column])
                   .column(column).to_pylist())
    return "".join(out).encode("utf-8")


def _wikitext(name: str, variant: str, facts: dict[str, FileFacts], hub_config: str) -> Release:
    return Release(name, {s: f"wiki.{s}.{variant}" for s in SPLITS}, facts,
                   hub=_wikitext_hub(hub_config), hub_name=f"Salesforce/wikitext ({hub_config})",
                   folder=name)


def release_for(dataset: str, variant: str = "tokens") -> Release:
    """The :class:`Release` of ``dataset`` (a name of :data:`DATASETS` or ``dir:PATH``)."""
    if variant not in ("tokens", "raw"):
        raise ValueError(f"variant must be 'tokens' or 'raw'; got {variant!r}")
    if variant == "raw" and dataset not in ("wikitext-2", "wikitext-103"):
        raise ValueError(f"variant 'raw' exists only for wikitext-2 and wikitext-103, not "
                         f"{dataset!r}; leave --variant at its default (tokens)")
    if dataset == "wikitext-2":
        return _wikitext("wikitext-2", variant, _wikitext2_facts(), f"wikitext-2-{'raw-' * (variant == 'raw')}v1")
    if dataset == "wikitext-103":
        return _wikitext("wikitext-103", variant, _WT103_FACTS,
                         f"wikitext-103-{'raw-' * (variant == 'raw')}v1")
    if dataset == "ptb":
        return Release("ptb", {s: f"ptb.{s}.txt" for s in SPLITS}, _PTB_FACTS, hub=_ptb_hub,
                       hub_name="ptb-text-only/ptb_text_only", folder="ptb")
    if dataset == "enwik8":
        # XML whose 90M/95M cuts may fall inside a UTF-8 character: modelled as bytes only
        return Release("enwik8", {s: "enwik8" for s in SPLITS}, _ENWIK8_FACTS,
                       byte_split=_HUTTER_SPLIT, tokenizers=("byte",), folder="enwik8")
    if dataset == "text8":
        return Release("text8", {s: "text8" for s in SPLITS}, _TEXT8_FACTS,
                       byte_split=_HUTTER_SPLIT, folder="text8")
    if dataset.startswith(DIR_PREFIX) and dataset[len(DIR_PREFIX):]:
        return Release(dataset, {s: f"{s}.txt" for s in SPLITS})
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or dir:PATH (a folder of "
                     f"train.txt, valid.txt, test.txt); got {dataset!r}")


def dataset_slug(dataset: str) -> str:
    """A folder name for ``dataset``: its name, or ``dir-<folder name>`` for ``dir:PATH``."""
    if dataset.startswith(DIR_PREFIX):
        return "dir-" + (Path(dataset[len(DIR_PREFIX):]).expanduser().resolve().name or "root")
    return dataset


# --------------------------------------------------------------------------------------------
# Verification (streaming)
# --------------------------------------------------------------------------------------------

def _mismatch(release: Release, where: str, name: str, what: str, expected, found,
              remedy: str) -> DataError:
    exp = f"{expected:,}" if isinstance(expected, int) else expected
    fnd = f"{found:,}" if isinstance(found, int) else found
    return DataError(f"{where} does not match the published {release.name} file {name}: expected "
                     f"{what} {exp}, found {fnd} (the file is truncated or altered). {remedy}")


def verify_path(release: Release, path: Path, name: str, remedy: str) -> str:
    """Check the file at ``path`` against what is published about ``name``; its sha256."""
    facts = release.facts.get(name, FileFacts(name))
    size = path.stat().st_size
    if facts.size is not None and size != facts.size:  # first: the clearest message
        raise _mismatch(release, str(path), name, "a size of", facts.size, size, remedy)
    digests = {"sha256": hashlib.sha256(), "sha1": hashlib.sha1(), "md5": hashlib.md5()}
    lines, seen, head = 0, bytearray(256), b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            for h in digests.values():
                h.update(chunk)
            lines += chunk.count(b"\n")
            if len(head) < 64:
                head += chunk[:64]
            if facts.distinct_bytes is not None:
                for b in set(chunk):
                    seen[b] = 1
    if facts.lines is not None and lines != facts.lines:
        raise _mismatch(release, str(path), name, "a line count of", facts.lines, lines, remedy)
    if facts.header is not None and not head.startswith(facts.header):
        raise _mismatch(release, str(path), name, "to start with", facts.header, head[:16], remedy)
    if facts.distinct_bytes is not None and sum(seen) != facts.distinct_bytes:
        raise _mismatch(release, str(path), name, "distinct byte values:", facts.distinct_bytes,
                        sum(seen), remedy)
    for algo in ("sha256", "sha1", "md5"):
        expected = getattr(facts, algo)
        if expected is not None and digests[algo].hexdigest() != expected:
            raise _mismatch(release, str(path), name, algo, expected, digests[algo].hexdigest(),
                            remedy)
    return digests["sha256"].hexdigest()


# --------------------------------------------------------------------------------------------
# Locating
# --------------------------------------------------------------------------------------------

def cache_root() -> Path:
    root = os.environ.get(ENV_CACHE_DIR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bkbench"


def _needed(release: Release, scheme: str) -> list[str]:
    splits = SPLITS if scheme == "official" else ("valid", "test")
    return list(dict.fromkeys(release.files[s] for s in splits))


def _explicit_dir(release: Release, data_dir) -> tuple[Path, str, str] | None:
    if release.name.startswith(DIR_PREFIX):
        return (Path(release.name[len(DIR_PREFIX):]).expanduser(), "dir",
                f"the folder of --dataset {release.name}")
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir", f"data_dir {str(data_dir)!r} (--data-dir)"
    if os.environ.get(ENV_DATA_DIR):
        return (Path(os.environ[ENV_DATA_DIR]).expanduser(), "env",
                f"{ENV_DATA_DIR}={os.environ[ENV_DATA_DIR]!r}")
    return None


def locate(release: Release, scheme: str, data_dir=None, cache_dir=None, download: bool = True
           ) -> tuple[Path, str, dict[str, tuple[Path, str]]]:
    """Find, verify (and if need be download) the files: (folder, source, name -> (path, sha256))."""
    names = _needed(release, scheme)
    explicit = _explicit_dir(release, data_dir)
    if explicit is not None:
        folder, origin, label = explicit
        if not folder.is_dir():
            raise DataError(f"{label} does not exist or is not a folder; point it at a folder "
                            f"that holds {', '.join(names)}.")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            hint = (" " + _PROXY_HINT if release.name == "wikitext-2" and scheme == "official"
                    and missing == [release.files["train"]] else "")
            raise DataError(f"{release.name}: {folder} (from {label}) lacks {', '.join(missing)}; "
                            f"an explicitly given folder must hold {', '.join(names)}.{hint}")
        remedy = "Replace it with an intact copy of the release."
        return folder, origin, {n: (folder / n, verify_path(release, folder / n, n, remedy))
                                for n in names}

    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / release.folder
    found, source = {}, "cache"
    for n in names:
        path = folder / n
        if not path.is_file():
            if not download or release.hub is None:
                how = ("downloading was switched off" if release.hub is not None
                       else f"{release.name} is not downloaded automatically (this project "
                            "knows no Hugging Face Hub copy of its files)")
                raise DataError(f"{release.name}: {n} was not found in {folder} (the bkbench "
                                f"cache) and {how}. Put the release's files in a folder and pass "
                                f"--data-dir DIR (or set {ENV_DATA_DIR}), or copy them into "
                                f"{folder}.")
            _download(release, n, path)
            source = "download"
        found[n] = (path, verify_path(release, path, n, f"Delete {path} and run again to "
                                                         "download it afresh."))
    return folder, source, found


def _download(release: Release, name: str, path: Path) -> None:
    split = next(s for s in SPLITS if release.files[s] == name)
    try:
        data = release.hub(split)
    except Exception as exc:  # noqa: BLE001 -- offline, hub error, missing dependency...
        raise DataError(f"{release.name}: {name} is not in the cache ({path.parent}) and "
                        f"downloading it from the Hugging Face Hub ({release.hub_name}) failed: "
                        f"{type(exc).__name__}: {exc}. Supply the release's files with "
                        "--data-dir DIR.") from exc
    tmp = path.with_name(f".{name}.download")
    write_bytes_atomic(tmp, data)
    try:
        verify_path(release, tmp, name, "It was not saved; supply verified files with "
                                        "--data-dir (the Hub copy may have changed).")
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Splits: byte ranges of the files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitSource:
    """Bytes ``[start, end)`` of ``path``: the text of one split."""

    path: Path
    start: int
    end: int
    description: str


def split_sources(release: Release, scheme: str, files: dict[str, tuple[Path, str]]
                  ) -> dict[str, SplitSource]:
    """Each split's byte range (the official splits, the 90M/5M/5M cut, or WikiText-2's proxy)."""
    if scheme == "proxy":
        return _proxy_sources(release, files)
    if release.byte_split is not None:
        path = files[release.files["train"]][0]
        size = path.stat().st_size
        a, b = release.byte_split
        if size < b:
            raise DataError(f"{path} has {size:,} bytes, fewer than the {b:,} its "
                            "90M/5M/5M-style split needs")
        cuts = {"train": (0, a), "valid": (a, b), "test": (b, size)}
        return {s: SplitSource(path, lo, hi, f"{path.name}, bytes {lo:,}-{hi:,}")
                for s, (lo, hi) in cuts.items()}
    out = {}
    for s in SPLITS:
        path = files[release.files[s]][0]
        out[s] = SplitSource(path, 0, path.stat().st_size, f"{path.name}, whole file")
    return out


def _proxy_sources(release: Release, files: dict[str, tuple[Path, str]]) -> dict[str, SplitSource]:
    if release.name != "wikitext-2":
        raise DataError(f"the proxy split scheme exists only for wikitext-2 (a machine without "
                        f"its train file); use --split-scheme official with {release.name}")
    valid = files[release.files["valid"]][0]
    test = files[release.files["test"]][0]
    data = test.read_bytes()
    lines = read_lines(data.decode("utf-8"))
    k = proxy_split_line(lines)
    cut = sum(len(line.encode("utf-8")) + 1 for line in lines[:k])
    return {
        "train": SplitSource(valid, 0, valid.stat().st_size,
                             f"{valid.name}, whole file (the official validation split)"),
        "valid": SplitSource(test, 0, cut, f"{test.name}, lines 1-{k:,} of {len(lines):,} "
                                           "(first part of the official test split)"),
        "test": SplitSource(test, cut, len(data), f"{test.name}, lines {k + 1:,}-{len(lines):,} "
                                                  "(rest of the official test split)"),
    }
