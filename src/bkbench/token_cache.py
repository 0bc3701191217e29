"""Token ids tokenized once into a memory-mapped cache (docs/data.md#the-token-cache).

:func:`load_corpus` finds and verifies a dataset's files (bkbench.corpora), then reads its token
ids from ``$BKBENCH_CACHE_DIR/tokens/<dataset>/<tokenizer>-<key>/``, building that entry first if
it is missing.  ``key`` hashes everything the ids depend on (the sha256 of the source files, the
form, split scheme and tokenizer), so a changed file never reuses stale ids.  The entry holds

- ``{train,valid,test}.ids``: the ids as little-endian int64, opened with ``np.memmap``, so a
  run's memory does not grow with the corpus (WikiText-103: 103M tokens, 0.8 GB on disk);
- ``vocab.json`` (word tokenizer) or ``tokenizer.json`` (BPE, Hugging Face ``tokenizers``);
- ``meta.json``, written last: its presence marks the entry complete.

Building streams the text in chunks of whole lines (or of whole words for enwik8/text8) and shows
a progress bar.  After each chunk the ids are appended to ``<split>.ids.partial`` and the byte
offset reached in the source is recorded in ``<split>.progress.json``; an interrupted build
resumes from there (the vocabulary/BPE model is saved before any split is encoded).

Tokenizers (``word``, ``byte``, ``bpe:N``) and their conventions
    ``word``: whitespace-separated words plus ``<eos>`` per line, vocabulary from the train split
    in first-occurrence order (identical to :func:`bkbench.data.load_wikitext2`, which is the
    in-memory reference the tests compare against).  ``byte``: the split's bytes (for line
    corpora each line followed by one newline).  ``bpe:N``: a byte-level BPE of N tokens trained
    on the train split's text; each line (with its newline) is encoded on its own, so the
    pre-tokenization never joins text across lines and the ids do not depend on the chunking.
    Byte-level BPE is lossless, so bits per byte are exact for every tokenizer.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .atomic import write_json_atomic
from .corpora import (Release, SplitSource, cache_root, dataset_slug, locate, release_for,
                      split_sources)
from .data import EOS, SPLITS, DataError, Vocab, WikiText2

CACHE_FORMAT = 2   # part of the entry key: a new format never reads an old entry
TEXT_CHUNK = 1 << 22   # bytes of text encoded between two progress records
BPE_MIN, BPE_MAX = 260, 1 << 20


def parse_tokenizer(spec: str) -> tuple[str, int | None]:
    """``"word"``/``"byte"`` -> (kind, None); ``"bpe:N"`` -> ("bpe", N); ValueError otherwise."""
    if spec in ("word", "byte"):
        return spec, None
    if spec.startswith("bpe:") and spec[4:].isdigit() and BPE_MIN <= int(spec[4:]) <= BPE_MAX:
        return "bpe", int(spec[4:])
    raise ValueError(f"tokenizer must be 'word', 'byte' or 'bpe:N' with {BPE_MIN} <= N <= "
                     f"{BPE_MAX} (a byte-level BPE of N tokens); got {spec!r}")


# --------------------------------------------------------------------------------------------
# Streaming the text of a split
# --------------------------------------------------------------------------------------------

def iter_chunks(source: SplitSource, by_lines: bool, start: int | None = None
                ) -> Iterator[tuple[int, bytes]]:
    """(source offset reached, bytes) per chunk of ``source`` from byte ``start``.

    A chunk ends at a piece boundary: after a newline (``by_lines``), else just before a space,
    so no line or word is split between chunks (a longer one makes a longer chunk).  For line
    corpora a last line without a newline gets one, as the word convention counts it.
    """
    sep = b"\n" if by_lines else b" "
    pos = source.start if start is None else start
    buf = b""
    with open(source.path, "rb") as f:
        f.seek(pos)
        while pos < source.end:
            want = min(TEXT_CHUNK, source.end - pos - len(buf))
            more = f.read(want) if want > 0 else b""
            if want > 0 and not more:
                raise DataError(f"{source.path} ended at byte {pos + len(buf):,}, before "
                                f"{source.end:,}: it changed while it was read")
            data = buf + more
            if pos + len(data) < source.end:
                cut = data.rfind(sep)
                if cut < (0 if by_lines else 1):  # no boundary yet: read on
                    buf = data
                    continue
                cut += by_lines                   # lines keep their newline
                data, buf = data[:cut], data[cut:]
            else:
                buf = b""
            pos += len(data)
            if by_lines and pos == source.end and not data.endswith(b"\n"):
                data += b"\n"
            yield pos, data


def _decode(data: bytes, source_name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source_name} is not valid UTF-8 ({exc}); only the byte tokenizer "
                        "can read it") from exc


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` (which ends with a newline), each with its newline."""
    return [line + "\n" for line in text.split("\n")[:-1]]


def split_num_bytes(source: SplitSource, by_lines: bool) -> int:
    """Bytes of the split's text: the range, plus the newline a last unterminated line gets."""
    n = source.end - source.start
    if by_lines and n:
        with open(source.path, "rb") as f:
            f.seek(source.end - 1)
            n += f.read(1) != b"\n"
    return n


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

class _Encoder:
    """Turns chunks into ids; counts out-of-vocabulary words and the split's words (the
    published word convention: words plus one ``<eos>`` per line) when the text is decodable."""

    def __init__(self, kind: str, by_lines: bool, vocab: Vocab, bpe=None,
                 count_words: bool = True):
        self.kind, self.by_lines, self.vocab, self.bpe = kind, by_lines, vocab, bpe
        self.count_words = count_words

    def encode(self, data: bytes, where: str) -> tuple[np.ndarray, int, int | None]:
        """(ids, out-of-vocabulary words, words in the chunk or None)."""
        if self.kind == "byte":
            ids = np.frombuffer(data, np.uint8).astype(np.int64)
            return ids, 0, (self._words(_decode(data, where)) if self.count_words else None)
        text = _decode(data, where)
        if self.kind == "bpe":
            pieces = split_lines(text) if self.by_lines else [text]
            ids = [i for enc in self.bpe.encode_batch(pieces, add_special_tokens=False)
                   for i in enc.ids]
            return np.asarray(ids, np.int64), 0, self._words(text)
        get = self.vocab.stoi.get
        out: list[int] = []
        for piece in (text.split("\n")[:-1] if self.by_lines else [text]):
            out.extend(get(w, -1) for w in piece.split())
            if self.by_lines:
                out.append(self.vocab.eos_id)
        ids = np.asarray(out, np.int64)
        missing = ids < 0
        ids[missing] = self.vocab.unk_id
        return ids, int(missing.sum()), len(ids)

    def _words(self, text: str) -> int:
        if self.by_lines:
            return sum(len(line.split()) + 1 for line in text.split("\n")[:-1])
        return len(text.split())


def _word_vocab(source: SplitSource, by_lines: bool, progress: bool) -> Vocab:
    seen: dict[str, None] = {}
    for _, data in _with_progress(source, by_lines, progress, "vocabulary of train"):
        text = _decode(data, str(source.path))
        for piece in (text.split("\n")[:-1] if by_lines else [text]):
            seen.update(dict.fromkeys(piece.split()))
            if by_lines:
                seen.setdefault(EOS)
    return Vocab.from_words(seen)


def _train_bpe(source: SplitSource, by_lines: bool, size: int, progress: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    texts = (_decode(data, str(source.path))
             for _, data in _with_progress(source, by_lines, False, ""))
    tok.train_from_iterator((p for text in texts
                             for p in (split_lines(text) if by_lines else [text])),
                            trainer=trainer)
    return tok


def bpe_vocab(tok) -> Vocab:
    """A :class:`Vocab` of a byte-level BPE: its tokens by id; end of line = the newline token."""
    itos = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    newline = tok.token_to_id("\u010a")   # byte-level spelling of "\n"
    return Vocab(itos, "bpe", eos_id=newline)


def _with_progress(source: SplitSource, by_lines: bool, progress: bool, label: str,
                   start: int | None = None) -> Iterator[tuple[int, bytes]]:
    from tqdm import tqdm

    first = source.start if start is None else start
    with tqdm(total=source.end - source.start, initial=first - source.start, unit="B",
              unit_scale=True, desc=label, disable=not progress, file=sys.stderr) as bar:
        last = first
        for pos, data in iter_chunks(source, by_lines, first):
            yield pos, data
            bar.update(pos - last)
            last = pos


# --------------------------------------------------------------------------------------------
# The cache entry
# --------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    folder: Path
    kind: str
    bpe_size: int | None

    def ids_path(self, split: str) -> Path:
        return self.folder / f"{split}.ids"


def _entry_key(release: Release, variant: str, scheme: str, tokenizer: str,
               checksums: dict[str, str]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "dataset": release.name, "variant": variant,
                          "scheme": scheme, "tokenizer": tokenizer, "files": checksums},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_or_train_vocab(entry: _Entry, train: SplitSource, by_lines: bool, progress: bool):
    """(Vocab, BPE tokenizer or None), from the entry when saved there (resume), else built."""
    if entry.kind == "byte":
        return Vocab.byte_level(), None
    if entry.kind == "bpe":
        from tokenizers import Tokenizer
        path = entry.folder / "tokenizer.json"
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
        else:
            tok = _train_bpe(train, by_lines, entry.bpe_size, progress)
            tmp = path.with_name(".tokenizer.json.tmp")
            tok.save(str(tmp))
            os.replace(tmp, path)
        return bpe_vocab(tok), tok
    path = entry.folder / "vocab.json"
    if path.is_file():
        return Vocab(json.loads(path.read_text("utf-8")), "word"), None
    vocab = _word_vocab(train, by_lines, progress)
    write_json_atomic(path, vocab.itos)
    return vocab, None


def _encode_split(entry: _Entry, split: str, source: SplitSource, encoder: _Encoder,
                  progress: bool) -> dict[str, int]:
    """Write ``<split>.ids`` (resuming a partial one); its counts of ids, out-of-vocabulary
    words and ``<unk>`` ids."""
    final = entry.ids_path(split)
    partial = final.with_name(final.name + ".partial")
    state_path = final.with_name(f"{split}.progress.json")
    state = {"offset": source.start, "tokens": 0, "oov": 0, "unk": 0,
             "words": 0 if encoder.count_words else None}
    if partial.is_file() and state_path.is_file():
        state = json.loads(state_path.read_text())
    with open(partial, "ab") as out:
        out.truncate(state["tokens"] * 8)   # drop ids written after the last record
        out.seek(state["tokens"] * 8)
        for pos, data in _with_progress(source, encoder.by_lines, progress,
                                        f"tokenizing {split}", start=state["offset"]):
            ids, oov, words = encoder.encode(data, f"{source.path} ({source.description})")
            out.write(ids.astype("<i8").tobytes())
            out.flush()
            os.fsync(out.fileno())
            unk = int((ids == encoder.vocab.unk_id).sum()) if encoder.kind == "word" else 0
            state = {"offset": pos, "tokens": state["tokens"] + len(ids),
                     "oov": state["oov"] + oov, "unk": state["unk"] + unk,
                     "words": None if words is None else state["words"] + words}
            write_json_atomic(state_path, state)
    os.replace(partial, final)
    state_path.unlink(missing_ok=True)
    return {k: state[k] for k in ("tokens", "oov", "unk", "words")}


def _memmap(path: Path) -> torch.Tensor:
    if path.stat().st_size == 0:
        return torch.empty(0, dtype=torch.long)
    # copy-on-write: torch needs a writable array; nothing is ever written back to the file
    return torch.from_numpy(np.memmap(path, dtype="<i8", mode="c"))


def _build(entry: _Entry, sources: dict[str, SplitSource], by_lines: bool, count_words: bool,
           progress: bool) -> dict:
    entry.folder.mkdir(parents=True, exist_ok=True)
    vocab, bpe = _load_or_train_vocab(entry, sources["train"], by_lines, progress)
    encoder = _Encoder(entry.kind, by_lines, vocab, bpe, count_words)
    counts = {}
    for s in SPLITS:
        if entry.ids_path(s).is_file() and (entry.folder / f"{s}.counts.json").is_file():
            counts[s] = json.loads((entry.folder / f"{s}.counts.json").read_text())
            continue
        counts[s] = _encode_split(entry, s, sources[s], encoder, progress)
        write_json_atomic(entry.folder / f"{s}.counts.json", counts[s])
    meta = {"format": CACHE_FORMAT, "counts": counts,
            "num_bytes": {s: split_num_bytes(sources[s], by_lines) for s in SPLITS}}
    write_json_atomic(entry.folder / "meta.json", meta)
    return meta


def load_corpus(dataset: str = "wikitext-2", variant: str = "tokens", scheme: str = "official",
                tokenizer: str = "word", *, data_dir=None, cache_dir=None,
                download: bool = True, progress: bool = False) -> WikiText2:
    """Load ``dataset`` as train/valid/test id tensors backed by the memory-mapped cache.

    Arguments as :func:`bkbench.data.load_wikitext2`, plus ``dataset`` (:data:`DATASETS` or
    ``dir:PATH``), ``tokenizer`` ``"bpe:N"`` and ``progress`` (progress bars while building the
    cache).  ``cache_dir`` is the folder of the dataset's files (default
    ``$BKBENCH_CACHE_DIR/<dataset>``); token ids live under ``$BKBENCH_CACHE_DIR/tokens``.
    """
    kind, bpe_size = parse_tokenizer(tokenizer)
    if scheme not in ("official", "proxy"):
        raise ValueError(f"scheme must be 'official' or 'proxy'; got {scheme!r}")
    release = release_for(dataset, variant)
    if kind not in release.tokenizers:
        raise ValueError(f"{dataset} is read with the {' or '.join(release.tokenizers)} "
                         f"tokenizer only, not {tokenizer!r} (its splits are cut at byte "
                         "offsets that may fall inside a UTF-8 character)")
    folder, origin, files = locate(release, scheme, data_dir, cache_dir, download)
    sources = split_sources(release, scheme, files)
    checksums = {p.name: digest for p, digest in files.values()}
    key = _entry_key(release, variant, scheme, tokenizer, checksums)
    entry = _Entry(cache_root() / "tokens" / dataset_slug(dataset)
                   / f"{tokenizer.replace(':', '')}-{key}", kind, bpe_size)
    meta_path = entry.folder / "meta.json"
    if not meta_path.is_file():
        entry.folder.mkdir(parents=True, exist_ok=True)
        # processes of one run (DDP ranks) load together: one builds, the others wait for it
        with open(entry.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not meta_path.is_file():
                _build(entry, sources, release.by_lines, "word" in release.tokenizers, progress)
    meta = json.loads(meta_path.read_text())
    vocab, _ = _load_or_train_vocab(entry, sources["train"], release.by_lines, False)
    ids = {s: _memmap(entry.ids_path(s)) for s in SPLITS}
    for s in SPLITS:
        if ids[s].numel() != meta["counts"][s]["tokens"]:
            raise DataError(f"the token cache {entry.ids_path(s)} holds {ids[s].numel():,} ids, "
                            f"its record says {meta['counts'][s]['tokens']:,}; delete "
                            f"{entry.folder} and run again")
    facts = {n: release.facts[n].method if n in release.facts else "none (sha256 recorded)"
             for n in checksums}
    return WikiText2(
        train=ids["train"], valid=ids["valid"], test=ids["test"], vocab=vocab,
        checksums=checksums, variant=variant, scheme=scheme, tokenizer=tokenizer,
        data_dir=str(folder), source=origin,
        split_sources={s: sources[s].description for s in SPLITS},
        oov_counts={s: meta["counts"][s]["oov"] for s in SPLITS},
        unk_counts={s: meta["counts"][s]["unk"] for s in SPLITS},
        num_bytes=dict(meta["num_bytes"]), verification=facts, dataset=dataset,
        num_words={s: meta["counts"][s]["words"] for s in SPLITS},
        token_cache=str(entry.folder))
