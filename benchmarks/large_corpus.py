"""Peak memory of training through the memory-mapped token cache: a large corpus vs WikiText-2.

Usage::

    python benchmarks/large_corpus.py                       # 50M-token corpus, 300 steps
    python benchmarks/large_corpus.py --tokens 200000 --steps 5 --work-dir /tmp/lc   # quick

It writes a synthetic corpus of at least ``--tokens`` word tokens (a ``dir:PATH`` dataset:
lines of 20 Zipf-distributed words from a 10,000-word vocabulary, plus ``<eos>``; valid and test
about the size of WikiText-2's proxy halves), then for it and for WikiText-2 (proxy scheme when
the train file is absent) runs, each in a fresh process:

1. building the token cache (streaming tokenization; its peak RSS is printed too), then
2. ``bkbench run`` of one model for ``--steps`` steps, which reads the cache by ``np.memmap``.

Each process reports its own peak RSS (``ru_maxrss``).  The check passes when the large
corpus's training run peaks within ``--limit-gib`` (1 GiB) of WikiText-2's: memory bounded
independently of corpus size.  Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS_PER_LINE = 20
VOCAB = 10_000
HELD_OUT_TOKENS = 120_000

CHILD = r"""
import json, resource, sys
from bkbench.token_cache import load_corpus
args = json.loads(sys.argv[1])
if args["mode"] == "build":
    d = load_corpus(args["dataset"], scheme=args["scheme"], tokenizer="word",
                    data_dir=args["data_dir"], progress=True)
    info = {"train_tokens": d.num_tokens["train"], "vocab": len(d.vocab)}
else:
    from bkbench.cli import main
    rc = main(args["argv"])
    info = {"rc": rc}
info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(info))
"""


def write_corpus(folder: Path, tokens: int, seed: int = 0) -> int:
    """Write train/valid/test.txt of Zipf-distributed words; the train split's token count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(VOCAB)])
    per_line = WORDS_PER_LINE + 1                      # the words and <eos>
    sizes = {"train": -(-tokens // per_line), "valid": HELD_OUT_TOKENS // per_line,
             "test": HELD_OUT_TOKENS // per_line}
    for split, lines in sizes.items():
        with open(folder / f"{split}.txt", "w") as f:
            for start in range(0, lines, 50_000):
                n = min(50_000, lines - start)
                ids = (rng.zipf(1.3, size=(n, WORDS_PER_LINE)) - 1) % VOCAB
                f.write("".join(" " + " ".join(row) + "\n" for row in words[ids]))
    return sizes["train"] * per_line


def _child(payload: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env,
                         capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"child process failed ({payload['mode']} {payload.get('dataset')})")
    return json.loads(lines[-1][len("RESULT "):])


def measure(dataset: str, data_dir: str | None, scheme: str, args, env: dict) -> dict:
    built = _child({"mode": "build", "dataset": dataset, "data_dir": data_dir, "scheme": scheme},
                   env)
    argv = ["run", "--preset", "smoke", "--models", args.model, "--tokenizer", "word",
            "--dataset", dataset, "--split-scheme", scheme, "--max-steps", str(args.steps),
            "--output-dir", str(args.work_dir / "runs" / dataset.replace("/", "_")),
            "--quiet", "--overwrite"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    trained = _child({"mode": "run", "argv": argv}, env)
    return {"build_mib": built["peak_rss_mib"], "train_mib": trained["peak_rss_mib"],
            "train_tokens": built["train_tokens"], "vocab": built["vocab"]}


def verdict(large: dict, small: dict, limit_gib: float) -> tuple[bool, float]:
    """(within the limit, excess of the large corpus's training peak over WikiText-2's in GiB)."""
    excess = (large["train_mib"] - small["train_mib"]) / 1024
    return excess <= limit_gib, excess


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=50_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="transformer_baseline")
    p.add_argument("--work-dir", type=Path, default=Path("benchmark_results/large_corpus"))
    p.add_argument("--wikitext-dir", default=os.environ.get(
        "BKBENCH_DATA_DIR", str(REPO.parent / "shared" / "data" / "wikitext-2")))
    p.add_argument("--limit-gib", type=float, default=1.0)
    args = p.parse_args(argv)

    corpus = args.work_dir / "corpus"
    train_tokens = write_corpus(corpus, args.tokens)
    print(f"synthetic corpus: {train_tokens:,} train tokens in {corpus}")
    env = {**os.environ, "BKBENCH_CACHE_DIR": str(args.work_dir / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("BKBENCH_DATA_DIR", None)
    scheme = "official" if (Path(args.wikitext_dir) / "wiki.train.tokens").is_file() else "proxy"
    rows = {"synthetic": measure(f"dir:{corpus}", None, "official", args, env),
            f"wikitext-2 ({scheme})": measure("wikitext-2", args.wikitext_dir, scheme, args, env)}
    print(f"\n{'corpus':22s} {'train tokens':>14s} {'vocab':>7s} {'build peak RSS':>15s} "
          f"{'train peak RSS':>15s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['train_tokens']:>14,} {r['vocab']:>7,} {r['build_mib']:>11,.0f} MiB "
              f"{r['train_mib']:>11,.0f} MiB")
    ok, excess = verdict(rows["synthetic"], rows[f"wikitext-2 ({scheme})"], args.limit_gib)
    shown = round(excess, 3) + 0.0   # + 0.0 turns a rounded -0.0 into 0.0: no "-0.000"
    print(f"\ntraining peak RSS, synthetic minus WikiText-2: {shown:+.3f} GiB "
          f"({'within' if ok else 'OVER'} the {args.limit_gib:g} GiB limit; {args.steps} steps "
          f"of {args.model}, smoke preset, word tokenizer)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
