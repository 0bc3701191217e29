"""WikiText-2: finding, verifying, splitting and tokenizing it (docs/data.md).

Public entry point: :func:`load_wikitext2`, which returns a :class:`WikiText2`.

Forms (``variant``)
    ``"tokens"`` -- the tokenized files ``wiki.{train,valid,test}.tokens`` (rare words already
    replaced by ``<unk>``; the default) and ``"raw"`` -- ``wiki.{train,valid,test}.raw``.

Where the files are looked for, in this order
    1. an explicit folder: the ``data_dir`` argument (``--data-dir``), else the environment
       variable ``BKBENCH_DATA_DIR``.  An explicit folder is authoritative: if it does not exist,
       or lacks a file the split scheme needs, that is an error -- we never quietly fall back to
       other copies of the data;
    2. the cache folder ``$BKBENCH_CACHE_DIR/wikitext-2`` (default ``~/.cache/bkbench/wikitext-2``);
    3. a download from the Hugging Face Hub (dataset ``Salesforce/wikitext``) into that cache.

Verification
    Every file with a name the project knows is checked before use: the four validation and test
    files by size and sha256, the two train files by line count, token count, (tokenized form)
    vocabulary size and the release's published SHA-1.  A mismatch raises :class:`DataError`; a damaged file is never used as a
    silently smaller data set.  Other files in the folder are ignored.

Token-counting convention (the one the published counts use)
    A file is split into lines at ``"\\n"`` (a final newline does not start an extra line).  Each
    line contributes its whitespace-separated words plus one ``<eos>``; an empty line contributes
    only ``<eos>``.  This gives 217,646 tokens for the validation split and 245,569 for the test
    split, in both forms.

Tokenizers
    ``"word"``: the convention above; the vocabulary is built from the *training split of the
    chosen scheme*, in first-occurrence order (so ``<eos>`` is id 0 on WikiText-2, whose files
    start with a blank line).  Words of the other splits missing from it map to ``<unk>``, which
    is appended to the vocabulary when the training split does not contain it (raw form).
    ``"byte"``: the UTF-8 bytes of each line followed by one newline byte (0x0A), which plays the
    role of ``<eos>``; the vocabulary is the 256 byte values and nothing is ever unknown.  For a
    file that ends with a newline (all official ones do) the byte stream is exactly the file's
    bytes, so bits per byte can be reported against the file size.

Split schemes
    ``"official"``: train/valid/test = the official train/validation/test files.
    ``"proxy"``, for machines without the train split: train = the whole official validation
    file; valid = the official test file up to the article boundary nearest its middle; test = the
    rest.  Articles start at top-level headings (a line `` = Title = `` with exactly one ``=`` on
    each side; `` = = Section = = `` is not one).  "Middle" is measured in word tokens (the
    convention above) of the test file, and the cut is made at a line boundary, just before a
    heading line, so both parts are whole articles.  Among boundaries equally near the middle the
    earlier one wins.  The cut is the same line for both forms and for both tokenizers, so the
    proxy valid/test text is always the same.  No model is selected on the data it is tested on.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .atomic import write_bytes_atomic

__all__ = [
    "SPLIT_SCHEMES", "VARIANTS", "TOKENIZERS", "EOS", "UNK", "DataError", "KnownFile",
    "KNOWN_FILES", "Vocab", "WikiText2", "load_wikitext2", "file_name", "default_cache_dir",
    "read_lines", "count_tokens", "is_article_heading", "proxy_split_line", "verify_file",
]

SPLIT_SCHEMES = ("official", "proxy")
VARIANTS = ("tokens", "raw")
TOKENIZERS = ("word", "byte")
SPLITS = ("train", "valid", "test")

EOS = "<eos>"
UNK = "<unk>"

ENV_DATA_DIR = "BKBENCH_DATA_DIR"
ENV_CACHE_DIR = "BKBENCH_CACHE_DIR"

# The Hugging Face Hub copy.  File names as listed in the dataset's repository (main branch,
# after its "Convert dataset to Parquet" commit): <config>/<split>-00000-of-00001.parquet, each
# with a single string column "text".  Each row is one line of the original file *including* its
# trailing "\n", except that whitespace-only lines were stored as "" -- in the official files
# those lines are a single space, so "" converts back to " \n".  Whatever the reconstruction, the
# result is verified against the known sizes/checksums/counts before it is written to the cache.
HF_REPO_ID = "Salesforce/wikitext"
HF_CONFIGS = {"tokens": "wikitext-2-v1", "raw": "wikitext-2-raw-v1"}
HF_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}


class DataError(ValueError):
    """The data cannot be found, fetched, or trusted (missing, truncated or altered files)."""


# --------------------------------------------------------------------------------------------
# Known files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownFile:
    """What the project knows about one official file; ``None`` means "not checked"."""

    name: str
    lines: int
    tokens: int
    size: int | None = None
    sha256: str | None = None
    vocab: int | None = None  # distinct words + <eos> (the word-level vocabulary it yields)
    sha1: str | None = None

    @property
    def method(self) -> str:
        if self.sha256 is not None:
            return "size+sha256"
        return ("lines+tokens" + ("+vocab" if self.vocab is not None else "")
                + ("+sha1" if self.sha1 is not None else ""))


KNOWN_FILES: dict[str, KnownFile] = {
    f.name: f for f in (
        # The four validation and test files of the offline copy this project is tested with.
        KnownFile("wiki.valid.tokens", lines=3_760, tokens=217_646, size=1_121_681,
                  sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        KnownFile("wiki.test.tokens", lines=4_358, tokens=245_569, size=1_256_449,
                  sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        KnownFile("wiki.valid.raw", lines=3_760, tokens=217_646, size=1_146_846,
                  sha256="4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
        KnownFile("wiki.test.raw", lines=4_358, tokens=245_569, size=1_290_590,
                  sha256="173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
        # The train files are not available on the machines this was written on.  They are
        # verified by the published line count (36,718) and token count (2,088,628), the
        # tokenized one also by the standard vocabulary size (33,278 = distinct words + <eos>), and
        # both by the SHA-1 that GluonNLP's WikiText2 / WikiText2Raw dataset definitions publish
        # for the release's files.  Those definitions give the SHA-1 of the validation and test
        # files too, and all four equal the SHA-1 of the copies above, so the train values
        # describe the same release.  (SHA-1 has known collision attacks, but matching a given
        # digest -- a second preimage -- is out of reach, so a fabricated file still fails.)
        # The raw train token count is taken to equal the tokenized one: the tokenized form is
        # the raw form with rare words replaced one-for-one by <unk>, and the validation and test
        # files of the two forms do have identical line and token counts.  The counts are
        # checked before the digest because their messages say what is wrong (truncation).
        KnownFile("wiki.train.tokens", lines=36_718, tokens=2_088_628, vocab=33_278,
                  sha1="863f29c46ef9d167fff4940ec821195882fe29d1"),
        KnownFile("wiki.train.raw", lines=36_718, tokens=2_088_628,
                  sha1="d33faf256327882db0edc7c67cd098d1051a2112"),
    )
}


def file_name(split: str, variant: str) -> str:
    """``("valid", "tokens") -> "wiki.valid.tokens"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    _check_choice("variant", variant, VARIANTS)
    return f"wiki.{split}.{variant}"


def default_cache_dir() -> Path:
    """``$BKBENCH_CACHE_DIR/wikitext-2``, else ``~/.cache/bkbench/wikitext-2``."""
    root = os.environ.get(ENV_CACHE_DIR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "bkbench"
    return base / "wikitext-2"


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------

def read_lines(text: str) -> list[str]:
    """Lines split at ``"\\n"`` only; a final newline does not start an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def count_tokens(lines: Iterable[str]) -> int:
    """Words + one ``<eos>`` per line (the convention of the published counts)."""
    return sum(len(line.split()) + 1 for line in lines)


_HEADING = re.compile(r" = [^=](?:.*[^=])? = ")


def is_article_heading(line: str) -> bool:
    """True for a top-level heading `` = Title = `` (not `` = = Section = = ``)."""
    return _HEADING.fullmatch(line) is not None


def proxy_split_line(lines: Sequence[str]) -> int:
    """Index of the first line of the proxy *test* part of the official test file.

    It is the index of the top-level heading (other than the first one) whose start lies nearest
    to the middle of the file measured in word tokens (words + one ``<eos>`` per line); ties go
    to the earlier heading.  Lines ``[0, k)`` are the proxy validation part, ``[k, end)`` the test.
    """
    headings = [i for i, line in enumerate(lines) if is_article_heading(line)]
    if len(headings) < 2:
        raise DataError(f"cannot make the proxy split: the official test split has "
                        f"{len(headings)} top-level article heading(s), at least 2 are needed")
    counts = [len(line.split()) + 1 for line in lines]
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    total = prefix[-1]
    # compare 2*prefix with total to stay in integers
    return min(headings[1:], key=lambda i: (abs(2 * prefix[i] - total), i))


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not valid UTF-8 ({exc}); the file is damaged") from exc


def _verify_bytes(data: bytes, name: str, where: str, remedy: str) -> tuple[str, list[str]]:
    """Check ``data`` (the content of file ``name``) against :data:`KNOWN_FILES`.

    Returns ``(sha256, lines)``.  ``where`` names the file in messages; ``remedy`` says what to do
    about a mismatch.
    """
    digest = hashlib.sha256(data).hexdigest()
    known = KNOWN_FILES.get(name)

    def fail(what: str, expected: Any, found: Any) -> DataError:
        exp = f"{expected:,}" if isinstance(expected, int) else expected
        fnd = f"{found:,}" if isinstance(found, int) else found
        return DataError(f"{where} does not match the official WikiText-2 {name}: expected "
                         f"{what} {exp}, found {fnd} (the file is truncated or altered). {remedy}")

    if known is not None and known.size is not None and len(data) != known.size:
        raise fail("a size of", known.size, len(data))  # checked first: the clearest message
    if known is not None and known.sha256 is not None and digest != known.sha256:
        raise fail("sha256", known.sha256, digest)
    lines = read_lines(_decode(data, where))
    if known is not None and known.sha256 is None:  # no checksum known: count instead
        if len(lines) != known.lines:
            raise fail("a line count of", known.lines, len(lines))
        n_tokens = count_tokens(lines)
        if n_tokens != known.tokens:
            raise fail("a token count of", known.tokens, n_tokens)
        if known.vocab is not None:
            words = {w for line in lines for w in line.split()}
            words.add(EOS)
            if len(words) != known.vocab:
                raise fail("a vocabulary size of", known.vocab, len(words))
        if known.sha1 is not None:
            sha1 = hashlib.sha1(data).hexdigest()
            if sha1 != known.sha1:
                raise fail("SHA-1", known.sha1, sha1)
    return digest, lines


# no WikiText-2 file is near this (the train files are about 11 MB); checked before reading, so
# that a wrong or hostile file fails with a message instead of exhausting memory
MAX_FILE_BYTES = 64 << 20


def _read_sized(path: Path, name: str, remedy: str) -> bytes:
    """The bytes of ``path``, after checking its size against the official one (or the cap)."""
    size = path.stat().st_size
    known = KNOWN_FILES.get(name)
    if known is not None and known.size is not None and size != known.size:
        raise DataError(f"{path} does not match the official WikiText-2 {name}: expected a size "
                        f"of {known.size:,}, found {size:,} (the file is truncated or altered). "
                        f"{remedy}")
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {size:,} bytes, far more than any WikiText-2 file "
                        f"(at most {MAX_FILE_BYTES:,} are read); it is not {name}. {remedy}")
    return path.read_bytes()


def verify_file(path: str | os.PathLike) -> str:
    """Verify one file (if its name is a known one) and return its sha256."""
    path = Path(path)
    remedy = "Replace it with an intact copy."
    digest, _ = _verify_bytes(_read_sized(path, path.name, remedy), path.name, str(path), remedy)
    return digest


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

class Vocab:
    """A token vocabulary: ``itos`` (id -> token), ``stoi`` (token -> id), ``len()``.

    ``kind`` is ``"word"`` (tokens are words and ``<eos>``), ``"byte"`` (ids are byte values;
    ``itos`` holds printable names such as ``"a"`` or ``"<0x0A>"``) or ``"bpe"`` (the tokens of a
    byte-level BPE, bkbench.token_cache, whose ``eos_id`` is its newline token; text is encoded
    and decoded by the BPE model, not here).
    """

    def __init__(self, itos: Sequence[str], kind: str = "word", eos_id: int | None = None):
        _check_choice("kind", kind, TOKENIZERS + ("bpe",))
        self.kind = kind
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary entries must be distinct")
        if kind == "word":
            if EOS not in self.stoi or UNK not in self.stoi:
                raise ValueError(f"a word vocabulary must contain {EOS} and {UNK}")
            self.eos_id: int = self.stoi[EOS]
            self.unk_id: int | None = self.stoi[UNK]
        elif kind == "bpe":
            if eos_id is None or not 0 <= eos_id < len(self.itos):
                raise ValueError("a BPE vocabulary needs the id of its newline token")
            self.eos_id = eos_id
            self.unk_id = None
        else:
            if len(self.itos) != 256:
                raise ValueError("a byte vocabulary has exactly 256 entries")
            self.eos_id = 0x0A
            self.unk_id = None

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocab":
        """First-occurrence order over ``words``; ``<eos>`` and ``<unk>`` appended if absent."""
        itos = list(dict.fromkeys(words))
        seen = set(itos)
        for special in (EOS, UNK):
            if special not in seen:
                itos.append(special)
        return cls(itos, "word")

    @classmethod
    def byte_level(cls) -> "Vocab":
        names = [chr(b) if 0x21 <= b <= 0x7E else f"<0x{b:02X}>" for b in range(256)]
        return cls(names, "byte")

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __repr__(self) -> str:
        return f"Vocab(kind={self.kind!r}, size={len(self)})"

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` under this vocabulary's convention (see the module docstring)."""
        if self.kind == "bpe":
            raise ValueError("a BPE vocabulary encodes through its tokenizers model")
        lines = read_lines(text)
        if self.kind == "byte":
            return list(("\n".join(lines) + "\n").encode("utf-8")) if lines else []
        get, unk = self.stoi.get, self.unk_id
        return [get(w, unk) for w in _words(lines)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: bytes decoded as UTF-8, or words joined by spaces, ``<eos>`` = newline."""
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            raise ValueError("a BPE vocabulary decodes through its tokenizers model")
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        out: list[str] = []
        line: list[str] = []
        for i in ids:
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)


def _words(lines: Iterable[str]) -> list[str]:
    words: list[str] = []
    extend, append = words.extend, words.append
    for line in lines:
        extend(line.split())
        append(EOS)
    return words


# --------------------------------------------------------------------------------------------
# The loaded data set
# --------------------------------------------------------------------------------------------

@dataclass
class WikiText2:
    """WikiText-2 split, tokenized and verified.

    ``train``/``valid``/``test`` are 1-D ``torch.long`` tensors of ids in ``vocab``.
    ``checksums`` maps each source file used to its sha256; ``verification`` says how it was
    checked.  ``split_sources`` says, per split, which file and line range it came from.
    ``oov_counts`` counts the tokens of each split that were not in the vocabulary and were mapped
    to ``<unk>``; ``unk_counts`` counts all ``<unk>`` ids of each split (including the ``<unk>``
    words already present in the tokenized files).  Both are 0 for the byte tokenizer.
    ``num_bytes`` is the UTF-8 size of each split's text, newlines included, for bits per byte.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: Vocab
    checksums: dict[str, str]
    variant: str
    scheme: str
    tokenizer: str
    data_dir: str
    source: str  # "data_dir", "env", "cache" or "download"
    split_sources: dict[str, str]
    oov_counts: dict[str, int]
    unk_counts: dict[str, int]
    num_bytes: dict[str, int]
    verification: dict[str, str] = field(default_factory=dict)
    dataset: str = "wikitext-2"
    token_cache: str | None = None  # the memory-mapped ids' folder (bkbench.token_cache)
    # words of each split under the published convention (words + one <eos> per line), the
    # denominator of a word-level perplexity for any tokenizer; None where text is not words
    num_words: dict[str, int | None] | None = None

    @property
    def num_tokens(self) -> dict[str, int]:
        return {s: int(getattr(self, s).numel()) for s in SPLITS}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready (for results files)."""
        return {
            "dataset": self.dataset,
            "variant": self.variant,
            "scheme": self.scheme,
            "tokenizer": self.tokenizer,
            "data_dir": self.data_dir,
            "source": self.source,
            "vocab_size": len(self.vocab),
            "eos_id": self.vocab.eos_id,
            "unk_id": self.vocab.unk_id,
            "num_tokens": self.num_tokens,
            "num_bytes": dict(self.num_bytes),
            "oov_counts": dict(self.oov_counts),
            "unk_counts": dict(self.unk_counts),
            "split_sources": dict(self.split_sources),
            "checksums": dict(self.checksums),
            "verification": dict(self.verification),
            **({"token_cache": self.token_cache} if self.token_cache else {}),
            **({"num_words": dict(self.num_words)} if self.num_words else {}),
        }

    def describe(self) -> str:
        """A short human-readable summary."""
        unit = "bytes" if self.tokenizer == "byte" else "tokens"
        out = [f"{self.dataset} ({self.variant} form, {self.scheme} split scheme, {self.tokenizer} "
               f"tokenizer, vocabulary {len(self.vocab):,}) from {self.data_dir} ({self.source})"]
        for s in SPLITS:
            line = f"  {s:5s}: {self.num_tokens[s]:>9,} {unit}"
            if self.tokenizer == "word":
                line += f", {self.oov_counts[s]:,} out-of-vocabulary -> {UNK}"
            out.append(f"{line}  <- {self.split_sources[s]}")
        if self.scheme == "proxy":
            out.append("  (proxy scheme: NOT the official WikiText-2 splits)")
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; "
                         f"got {value!r}")


def _required_splits(scheme: str) -> tuple[str, ...]:
    return SPLITS if scheme == "official" else ("valid", "test")


_PROXY_HINT = ("Only the train split is missing: to run without it, use --split-scheme proxy "
               "(Python: scheme=\"proxy\"), which trains on the official validation split and "
               "validates and tests on the two halves of the official test split; results are "
               "then marked as proxy, not official.")


def _how_to_supply(names: Sequence[str], cache: Path | None) -> str:
    cache_txt = str(cache) if cache is not None else str(default_cache_dir())
    return ("Supply the files (" + ", ".join(names) + ") in one of three ways: "
            "(1) pass --data-dir DIR (Python: load_wikitext2(data_dir=DIR)) naming a folder that "
            f"holds them; (2) set the environment variable {ENV_DATA_DIR}=DIR; (3) put them in "
            f"the cache folder {cache_txt} (set {ENV_CACHE_DIR} to move it), where they are "
            f"also downloaded from the Hugging Face Hub ({HF_REPO_ID}) when it is reachable.")


def _missing_message(names: Sequence[str], missing: Sequence[str], dirs: Sequence[str],
                     cache: Path | None, cause: str | None, scheme: str,
                     variant: str) -> str:
    parts = [f"WikiText-2 ({variant} form, {scheme} split scheme) is not available: "
             f"missing {', '.join(missing)}.",
             f"Looked for {', '.join(names)} in: " + "; ".join(dirs) + "."]
    if cause:
        parts.append(cause)
    if scheme == "official" and list(missing) == [file_name("train", variant)]:
        parts.append(_PROXY_HINT)
    parts.append(_how_to_supply(names, cache))
    return " ".join(parts)


def _hf_download_text(split: str, variant: str) -> bytes:
    """Fetch one split from the Hub and rebuild the classic file's bytes (not yet verified)."""
    from huggingface_hub import hf_hub_download  # attribute looked up at call time (tests)
    import pyarrow.parquet as pq

    filename = f"{HF_CONFIGS[variant]}/{HF_SPLIT_NAMES[split]}-00000-of-00001.parquet"
    local = hf_hub_download(repo_id=HF_REPO_ID, filename=filename, repo_type="dataset")
    table = pq.read_table(local, columns=["text"])
    rows = table.column("text").to_pylist()
    out: list[str] = []
    for row in rows:
        row = row or ""
        if not row.strip():
            out.append(" \n")  # whitespace-only lines are a single space in the official files
        else:
            out.append(row if row.endswith("\n") else row + "\n")
    return "".join(out).encode("utf-8")


def _locate(variant: str, scheme: str, data_dir: str | os.PathLike | None,
            cache_dir: str | os.PathLike | None, download: bool
            ) -> tuple[Path, str, dict[str, tuple[str, list[str]]]]:
    """Find (and if need be download) the files; returns (folder, source, verified content)."""
    needed = _required_splits(scheme)
    names = [file_name(s, variant) for s in needed]

    explicit, origin = None, None
    if data_dir is not None:
        explicit, origin = Path(data_dir).expanduser(), "data_dir"
        label = f"data_dir {str(data_dir)!r} (--data-dir)"
    elif os.environ.get(ENV_DATA_DIR):
        explicit, origin = Path(os.environ[ENV_DATA_DIR]).expanduser(), "env"
        label = f"{ENV_DATA_DIR}={os.environ[ENV_DATA_DIR]!r}"

    if explicit is not None:
        if not explicit.is_dir():
            raise DataError(f"{label} does not exist or is not a folder; point it at a folder "
                            f"that holds {', '.join(names)}.")
        missing = [n for n in names if not (explicit / n).is_file()]
        if missing:
            raise DataError(_missing_message(
                names, missing, [f"{explicit} (from {label})"], None,
                "An explicitly given folder must hold every file the split scheme needs.",
                scheme, variant))
        remedy = ("Replace it with an intact copy (re-download WikiText-2, e.g. from the Hugging "
                  f"Face Hub dataset {HF_REPO_ID}), or remove it to use the bkbench cache.")
        content = {}
        for split, name in zip(needed, names):
            p = explicit / name
            content[split] = _verify_bytes(_read_sized(p, name, remedy), name, str(p), remedy)
        return explicit, origin, content

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    content: dict[str, tuple[str, list[str]]] = {}
    to_fetch: list[str] = []
    for split, name in zip(needed, names):
        p = cache / name
        if p.is_file():
            remedy = f"Delete the cache entry {p} and run again to download it afresh."
            content[split] = _verify_bytes(_read_sized(p, name, remedy), name, str(p), remedy)
        else:
            to_fetch.append(split)
    if not to_fetch:
        return cache, "cache", content

    dirs = [f"{cache} (the bkbench cache; no --data-dir or {ENV_DATA_DIR} given)"]
    missing = [file_name(s, variant) for s in to_fetch]
    if not download:
        raise DataError(_missing_message(names, missing, dirs, cache,
                                         "Downloading was switched off.", scheme, variant))
    for k, split in enumerate(to_fetch):
        name = file_name(split, variant)
        try:
            data = _hf_download_text(split, variant)
        except Exception as exc:  # noqa: BLE001 -- offline, hub error, missing dependency...
            still = [file_name(s, variant) for s in to_fetch[k:]]
            cause = (f"Downloading {name} from the Hugging Face Hub (dataset {HF_REPO_ID}, "
                     f"config {HF_CONFIGS[variant]}) failed: {type(exc).__name__}: {exc}")
            raise DataError(_missing_message(names, still, dirs, cache, cause, scheme,
                                             variant)) from exc
        where = f"{name} as downloaded from the Hugging Face Hub ({HF_REPO_ID})"
        content[split] = _verify_bytes(
            data, name, where, "It was not saved; report this (the Hub copy may have changed), "
            "and meanwhile supply verified files with --data-dir.")
        write_bytes_atomic(cache / name, data)
    return cache, "download", content


def load_wikitext2(data_dir: str | os.PathLike | None = None, variant: str = "tokens",
                   scheme: str = "official", tokenizer: str = "word", *,
                   cache_dir: str | os.PathLike | None = None,
                   download: bool = True) -> WikiText2:
    """Load WikiText-2 as train/valid/test id tensors.

    ``data_dir``: a folder with the ``wiki.*`` files (else ``$BKBENCH_DATA_DIR``, else the cache,
    else a download).  ``variant``: one of :data:`VARIANTS`; ``scheme``: one of
    :data:`SPLIT_SCHEMES`; ``tokenizer``: one of :data:`TOKENIZERS`.  ``cache_dir`` overrides the
    cache folder; ``download=False`` forbids going to the Hub.  Raises :class:`DataError` when
    the files cannot be found or fail verification, ``ValueError`` for a bad argument.
    """
    _check_choice("variant", variant, VARIANTS)
    _check_choice("scheme", scheme, SPLIT_SCHEMES)
    _check_choice("tokenizer", tokenizer, TOKENIZERS)

    folder, source, content = _locate(variant, scheme, data_dir, cache_dir, download)
    checksums = {file_name(s, variant): content[s][0] for s in content}
    verification = {n: KNOWN_FILES[n].method for n in checksums}

    def lines_desc(name: str, lo: int, hi: int, total: int) -> str:
        if lo == 0 and hi == total:
            return f"{name}, all {total:,} lines"
        return f"{name}, lines {lo + 1:,}-{hi:,} of {total:,}"

    if scheme == "official":
        parts = {s: content[s][1] for s in SPLITS}
        sources = {s: lines_desc(file_name(s, variant), 0, len(parts[s]), len(parts[s]))
                   for s in SPLITS}
    else:
        valid_lines, test_lines = content["valid"][1], content["test"][1]
        k = proxy_split_line(test_lines)
        parts = {"train": valid_lines, "valid": test_lines[:k], "test": test_lines[k:]}
        vname, tname, n = file_name("valid", variant), file_name("test", variant), len(test_lines)
        heads = sum(map(is_article_heading, test_lines))
        heads_before = sum(map(is_article_heading, test_lines[:k]))
        sources = {
            "train": lines_desc(vname, 0, len(valid_lines), len(valid_lines))
                     + " (the official validation split)",
            "valid": lines_desc(tname, 0, k, n)
                     + f" (articles 1-{heads_before} of {heads}; first part of the official test split)",
            "test": lines_desc(tname, k, n, n)
                    + f" (articles {heads_before + 1}-{heads} of {heads}; rest of the official test split)",
        }

    num_bytes = {s: (sum(len(line.encode("utf-8")) for line in parts[s]) + len(parts[s]))
                 for s in SPLITS}
    tensors: dict[str, torch.Tensor] = {}
    oov = {s: 0 for s in SPLITS}
    unk_counts = {s: 0 for s in SPLITS}
    if tokenizer == "byte":
        vocab = Vocab.byte_level()
        for s in SPLITS:
            data = ("\n".join(parts[s]) + "\n").encode("utf-8") if parts[s] else b""
            tensors[s] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    else:
        words = {s: _words(parts[s]) for s in SPLITS}
        vocab = Vocab.from_words(words["train"])
        get, unk = vocab.stoi.get, vocab.unk_id
        for s in SPLITS:
            ids = [get(w, -1) for w in words[s]]
            t = torch.tensor(ids, dtype=torch.long)
            missing = t < 0
            oov[s] = int(missing.sum())
            t[missing] = unk
            unk_counts[s] = int((t == unk).sum())
            tensors[s] = t

    return WikiText2(
        train=tensors["train"], valid=tensors["valid"], test=tensors["test"], vocab=vocab,
        checksums=checksums, variant=variant, scheme=scheme, tokenizer=tokenizer,
        data_dir=str(folder), source=source, split_sources=sources, oov_counts=oov,
        unk_counts=unk_counts, num_bytes=num_bytes, verification=verification,
    )
