"""Training-step and evaluation speed of every model, against this machine's fp32 GEMM roofline.

Usage::

    python benchmarks/train_step.py              # the default preset's sizes, V = 13,777
    python benchmarks/train_step.py --quick      # fewer repeats, a shorter evaluation stream
    python benchmarks/train_step.py --profile    # also the top ops of one step of each model
    python benchmarks/train_step.py --flag-rows  # also the baseline with each flag alone

Rows: the three runs of the default benchmark (Transformer, ResNet-BK baseline, ResNet-BK full)
plus any other architecture registered in ``bkbench.models.MODELS`` (with ``--flag-rows``, also
ResNet-BK baseline with each of the twelve flags alone), each built as the benchmark builds it and trained by ``bkbench.train.Trainer.train_step`` (the loss, backward, clipping,
optimizer and schedule the benchmark runs), on random tokens; and a plain-PyTorch reference:
the classic word-language-model Transformer (``nn.TransformerEncoder``, post-LN, ReLU MLP,
sinusoidal positions, biased decoder, full logits + ``F.cross_entropy``, default ``AdamW``,
clipping) with the same d_model, layers, heads, MLP width (4·d), vocabulary and batch.

* **train tok/s**: target tokens / wall time of one optimizer step; **eval tok/s**: tokens /
  time of ``bkbench.eval.evaluate`` over a random stream (eval mode, no gradient).
  Measurements are interleaved (model A, B, C, ..., then A, B, C again) so that a change in
  the machine's load hits every model alike; each cell is the median over repeats, with the
  smallest and largest repeat in brackets.
* **GFLOP/step**: ``bkbench.metrics.measure_step_flops`` (FlopCounterMode forward + backward,
  the optimizer by formula); **GFLOP/s** = that / the median step time.
* **roofline**: every matrix product of one step (aten mm/addmm/bmm/baddbmm with the shapes,
  strides and dtype the profiler recorded, LM head chunks included) is timed alone on this
  machine; the roofline is their FLOPs / the sum of their times, i.e. what the step's own
  GEMMs reach when nothing else runs. **share** = GFLOP/s / roofline (the counted non-GEMM
  FLOPs, attention and the BK-Core, are credited at the GEMM rate).
* **MoE vs dense**: forward + backward of the MoE layer of resnet_bk (top-1 of 4 experts,
  d -> 2d -> d) against one dense d -> 2d -> d FFN (the same active FLOPs), interleaved.
* **LM loss**: forward + backward of the LM head and loss at the step's (rows, d, V): the
  unfused ``F.cross_entropy(head(h))`` against the fused op at several chunk sizes (when the
  installed bkbench has ``bkbench.ops.lm_loss``).
* **optimizer**: one AdamW step over the Transformer's parameters with torch's default
  implementation, ``foreach=True`` and ``fused=True``.

Timings on a shared machine are indicative only; compare rows within one run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from bkbench.config import DEFAULT_RUNS, OPTIMIZATION_FLAGS, PRESETS, build_run_configs
from bkbench.eval import evaluate
from bkbench.metrics import measure_step_flops
from bkbench.flags import build_model as build_flagged_model
from bkbench.models import MODELS, build_model
from bkbench.train import Trainer, make_optimizer

PROXY_VOCAB = 13_777   # the word vocabulary of the proxy split scheme (trains on validation)


def machine_info() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return [f"cpu: {cpu}; logical cores: {os.cpu_count()} ({affinity} usable); "
            f"torch threads: {torch.get_num_threads()}",
            f"python {platform.python_version()}; torch {torch.__version__}; "
            f"bkbench from {os.path.dirname(sys.modules['bkbench'].__file__)}"]


# --- the reference model -------------------------------------------------------------------

class WordLMTransformer(nn.Module):
    """The classic PyTorch word-language-model Transformer, batch first, causal mask."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, d_ff: int, n_layers: int,
                 n_seq: int, dropout: float):
        super().__init__()
        self.d_model = d_model
        self.encoder = nn.Embedding(vocab_size, d_model)
        pos = torch.arange(n_seq).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(n_seq, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pe", pe)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(n_seq))
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.drop(self.encoder(idx) * math.sqrt(self.d_model) + self.pe[:T])
        x = self.transformer(x, mask=self.mask[:T, :T], is_causal=True)
        return self.decoder(x)


class ReferenceRunner:
    def __init__(self, model: nn.Module, grad_clip: float, lr: float):
        self.model = model
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model.train()
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()


# --- building the rows ---------------------------------------------------------------------

def bkbench_rows(args, vocab: int, train_tokens: torch.Tensor):
    overrides = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     n_seq=args.n_seq, batch_size=args.batch_size, device="cpu",
                     eval_batch_size=args.eval_batch_size, max_steps=10 ** 9)
    # named as the runs are, without the suffix an override of the preset's sizes adds
    configs = [c.replace(model_name=name) for name, c in
               zip(DEFAULT_RUNS, build_run_configs("default", overrides=overrides))]
    present = {c.architecture for c in configs}
    for arch in MODELS:   # peers registered beside the default runs
        if arch not in present:
            configs.append(configs[0].replace(model_name=arch, architecture=arch))
    if args.flag_rows:   # what each flag alone adds to the baseline's step (an ablation of speed)
        base = next(c for c in configs if c.model_name == "resnet_bk_baseline")
        configs += [base.replace(model_name=f"bk+{flag.removeprefix('use_')}", **{flag: True})
                    for flag in OPTIMIZATION_FLAGS]
    data = SimpleNamespace(train=train_tokens, valid=train_tokens[:1000],
                           test=train_tokens[:1000], vocab=SimpleNamespace(eos_id=0))
    rows = []
    for config in configs:
        if (args.models and config.model_name not in args.models
                and not (args.flag_rows and config.model_name.startswith("bk+"))):
            continue
        torch.manual_seed(config.seed)
        try:
            # with its flags applied, as the benchmark builds it (resnet_bk_full: all twelve)
            model, flags = build_flagged_model(config, vocab)
        except (TypeError, ValueError) as exc:
            print(f"  {config.model_name}: not built with the shared sizes ({exc}); no row")
            continue
        trainer = Trainer(config, model, data, torch.device("cpu"), progress=False, flags=flags)
        rows.append(SimpleNamespace(name=config.model_name, model=model, runner=trainer,
                                    optimizer=trainer.optimizer,
                                    compute_loss=trainer.compute_loss))
    return rows


def reference_row(args, vocab: int):
    torch.manual_seed(0)
    cfg = PRESETS["default"]
    model = WordLMTransformer(vocab, args.d_model, args.n_heads, 4 * args.d_model,
                              args.n_layers, args.n_seq, dropout=0.1)
    runner = ReferenceRunner(model, cfg["grad_clip"], cfg["lr"])
    return SimpleNamespace(name="reference: nn.TransformerEncoder", model=model, runner=runner,
                           optimizer=runner.optimizer)


# --- timing --------------------------------------------------------------------------------

def batch_of(stream: torch.Tensor, B: int, T: int, gen: torch.Generator):
    starts = torch.randint(0, stream.numel() - T - 1, (B,), generator=gen)
    chunk = stream[starts[:, None] + torch.arange(T + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def interleaved_throughput(rows, args, stream, eval_stream):
    gen = torch.Generator().manual_seed(1)
    tokens = args.batch_size * args.n_seq
    for row in rows:                       # warm-up: first-call allocations, lazy inits
        row.runner.train_step(*batch_of(stream, args.batch_size, args.n_seq, gen))
        row.train, row.eval, row.step_times = [], [], []
    for rep in range(args.repeats):
        for row in rows:
            for _ in range(args.steps):
                x, y = batch_of(stream, args.batch_size, args.n_seq, gen)
                t0 = time.perf_counter()
                row.runner.train_step(x, y)
                dt = time.perf_counter() - t0
                row.step_times.append(dt)
                row.train.append(tokens / dt)
            if isinstance(row.runner, Trainer):
                # as the run evaluates: the flags' evaluation model (e.g. the real int8 one)
                # and autocast; preparing it is set-up, outside the timed call
                eval_model = row.runner.flags.prepare_for_eval(row.model)
                t0 = time.perf_counter()
                row.runner.evaluate(eval_model, eval_stream)
            else:
                t0 = time.perf_counter()
                evaluate(row.model, eval_stream, args.n_seq, args.eval_batch_size)
            row.eval.append(eval_stream.numel() / (time.perf_counter() - t0))
        print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)


# --- FLOPs and the GEMM roofline -----------------------------------------------------------

# products and where their two factors are among the recorded inputs (an out= tensor may follow)
GEMMS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0,
         "aten::baddbmm": 1, "aten::baddbmm_": 1}


def gemm_flops(name: str, shapes) -> int:
    i = GEMMS[name]
    a, b = shapes[i], shapes[i + 1]
    if len(a) == 2:
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]


def recorded_gemms(step) -> dict:
    """(op, shapes, strides, dtypes) -> calls, for every matrix product of one ``step()``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls: dict = {}
    for ev in prof.events():
        if ev.name in GEMMS:
            shapes = tuple(tuple(s) for s in ev.input_shapes)
            strides = tuple(tuple(s) for s in ev.structured_input_strides)
            key = (ev.name, shapes, strides, tuple(ev.input_dtypes))
            calls[key] = calls.get(key, 0) + 1
    return calls


_DTYPES = {"float": torch.float32, "double": torch.float64, "c10::BFloat16": torch.bfloat16,
           "c10::Half": torch.float16}


def _operand(shape, stride, dtype):
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    return torch.randn(max(size, 1), dtype=dtype).as_strided(shape, stride)


_gemm_cache: dict = {}


def time_gemm(key, min_time: float) -> float:
    """Median seconds of one call of the recorded product, alone."""
    if key in _gemm_cache:
        return _gemm_cache[key]
    name, shapes, strides, dtypes = key
    n_tensors = 2 + GEMMS[name]   # an in-place accumulation is timed as its out-of-place form
    ops = [_operand(shapes[i], strides[i], _DTYPES.get(dtypes[i], torch.float32))
           for i in range(n_tensors)]
    fn = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::addmm_": torch.addmm,
          "aten::bmm": torch.bmm, "aten::baddbmm": torch.baddbmm,
          "aten::baddbmm_": torch.baddbmm}[name]
    fn(*ops)
    inner = 1
    while True:   # enough calls per sample to be measurable
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(*ops)
        if time.perf_counter() - t0 > min_time / 5 or inner > 10 ** 5:
            break
        inner *= 4
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(*ops)
        samples.append((time.perf_counter() - t0) / inner)
    _gemm_cache[key] = statistics.median(samples)
    return _gemm_cache[key]


def roofline(row, args, stream, min_time) -> tuple[float, float]:
    """(GEMM GFLOP of one step, the rate in GFLOP/s those GEMMs reach alone)."""
    gen = torch.Generator().manual_seed(2)
    x, y = batch_of(stream, args.batch_size, args.n_seq, gen)
    calls = recorded_gemms(lambda: row.runner.train_step(x, y))
    flops = seconds = 0.0
    for key, n in calls.items():
        f = gemm_flops(key[0], key[1])
        flops += n * f
        seconds += n * time_gemm(key, min_time)
    return flops / 1e9, flops / seconds / 1e9


def peak_gemm() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    key = ("aten::mm", ((1024, 1024), (1024, 1024)), ((1024, 1), (1024, 1)), ("float", "float"))
    del a, b
    return gemm_flops("aten::mm", key[1]) / time_gemm(key, 0.2) / 1e9


# --- side benchmarks -----------------------------------------------------------------------

def timed_pairs(fns: dict, repeats: int, min_time: float) -> dict[str, list[float]]:
    """Interleaved repeats of each fn: name -> seconds per call, one entry per repeat."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                if time.perf_counter() - t0 >= min_time:
                    break
            out[name].append((time.perf_counter() - t0) / n)
    return out


def moe_vs_dense(args) -> None:
    from bkbench.models.resnet_bk import Expert, MoEFeedForward, ResNetBKConfig
    torch.manual_seed(0)
    d = args.d_model
    cfg = ResNetBKConfig(vocab_size=PROXY_VOCAB, d_model=d, num_experts=4, top_k=1)
    moe, dense = MoEFeedForward(cfg).train(), Expert(d).train()
    x = torch.randn(args.batch_size, args.n_seq, d, requires_grad=True)
    w = torch.randn_like(x)

    def run(layer):
        def fn():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(w)
        return fn

    res = timed_pairs({"moe": run(moe), "dense": run(dense)}, args.repeats, args.min_time)
    m, dn = statistics.median(res["moe"]), statistics.median(res["dense"])
    print(f"MoE vs dense FFN, forward+backward on ({args.batch_size}x{args.n_seq}, d={d}), "
          f"median of {args.repeats} interleaved repeats:")
    print(f"  MoE (top-1 of 4 experts d->2d->d): {m * 1e3:8.2f} ms "
          f"[{min(res['moe']) * 1e3:.2f}-{max(res['moe']) * 1e3:.2f}]")
    print(f"  dense FFN d->2d->d:                {dn * 1e3:8.2f} ms "
          f"[{min(res['dense']) * 1e3:.2f}-{max(res['dense']) * 1e3:.2f}]")
    print(f"  MoE / dense: {m / dn:.2f}x")


def lm_loss_chunks(args) -> None:
    try:
        from bkbench.ops.lm_loss import default_chunk_rows, lm_head_nll
    except ImportError:
        print("LM loss: bkbench.ops.lm_loss not in this bkbench (unfused only); skipped")
        return
    torch.manual_seed(0)
    N, d, V = args.batch_size * args.n_seq, args.d_model, args.vocab
    h = torch.randn(N, d, requires_grad=True)
    w = (0.02 * torch.randn(V, d)).requires_grad_()
    t = torch.randint(0, V, (N,))

    def unfused():
        h.grad = w.grad = None
        F.cross_entropy(F.linear(h, w), t, reduction="sum").backward()

    def fused(chunk):
        def fn():
            h.grad = w.grad = None
            lm_head_nll(h, w, None, t, chunk_rows=chunk).backward()
        return fn

    def forward_only():   # what evaluation runs: the per-target NLL, no gradient
        with torch.no_grad():
            lm_head_nll(h, w, None, t, reduction="none", chunk_rows=default)

    default = default_chunk_rows(V)
    chunks = sorted({max(1, default // 4), default, 4 * default, 16 * default})
    fns = {"unfused": unfused, **{f"fused, {c} rows": fused(c) for c in chunks},
           "forward only (eval)": forward_only}
    res = timed_pairs(fns, args.repeats, args.min_time)
    base = statistics.median(res["unfused"])
    print(f"LM head + loss, forward+backward at rows={N}, d={d}, V={V} "
          f"(default chunk: {default} rows), median of {args.repeats} interleaved repeats:")
    for name, times in res.items():
        med = statistics.median(times)
        print(f"  {name:<20} {med * 1e3:8.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"
              f"  {base / med:5.2f}x")
    # both directions pay the log-softmax pass over every logit, so for a model whose step is
    # mostly its head this ratio bounds evaluation tokens/s over training tokens/s
    ratio = (statistics.median(res[f"fused, {default} rows"])
             / statistics.median(res["forward only (eval)"]))
    print(f"  head's training / evaluation time (default chunk): {ratio:.2f}x")


def optimizer_variants(args) -> None:
    torch.manual_seed(0)
    model = build_model("transformer", args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                        n_heads=args.n_heads, n_seq=args.n_seq)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        try:
            opts[name] = torch.optim.AdamW(params, lr=1e-6, **kw)
        except (RuntimeError, ValueError) as exc:
            print(f"  AdamW {name}: not available ({exc})")
    res = timed_pairs({k: o.step for k, o in opts.items()}, args.repeats, args.min_time)
    n = sum(p.numel() for p in params)
    print(f"AdamW step over the Transformer's {n:,} parameters, median of {args.repeats} "
          "interleaved repeats:")
    for name, times in res.items():
        print(f"  {name:<8} {statistics.median(times) * 1e3:7.2f} ms "
              f"[{min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}]")
    current = make_optimizer(model, build_run_configs("default")[0])
    print(f"  bkbench.train.make_optimizer: foreach={current.defaults.get('foreach')}, "
          f"fused={current.defaults.get('fused')}")


def profile_steps(rows, args, stream) -> None:
    from torch.profiler import ProfilerActivity, profile
    gen = torch.Generator().manual_seed(3)
    for row in rows:
        x, y = batch_of(stream, args.batch_size, args.n_seq, gen)
        row.runner.train_step(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            row.runner.train_step(x, y)
        print(f"profile of one training step: {row.name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# --- main ----------------------------------------------------------------------------------

def main(argv=None):
    defaults = PRESETS["default"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 repeats of 1 step, 8k evaluation tokens (same sizes)")
    ap.add_argument("--d-model", type=int, default=defaults["d_model"])
    ap.add_argument("--n-layers", type=int, default=defaults["n_layers"])
    ap.add_argument("--n-heads", type=int, default=defaults["n_heads"])
    ap.add_argument("--n-seq", type=int, default=defaults["n_seq"])
    ap.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=PROXY_VOCAB)
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps per repeat")
    ap.add_argument("--models", nargs="*", default=None, help="run names (default: all)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--flag-rows", action="store_true",
                    help="add resnet_bk_baseline with each flag alone (bk+<flag>)")
    ap.add_argument("--no-side", action="store_true",
                    help="skip the MoE, LM-loss and optimizer benchmarks")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    for name in ("d_model", "n_layers", "n_heads", "n_seq", "batch_size", "vocab",
                 "eval_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.n_heads:
        ap.error(f"--d-model ({args.d_model}) must be divisible by --n-heads ({args.n_heads})")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.steps = args.steps or (1 if args.quick else 3)
    args.eval_tokens = args.eval_tokens or (8192 if args.quick else 65536)
    args.min_time = 0.1 if args.quick else 0.3
    if args.repeats < 1 or args.steps < 1 or args.eval_tokens <= args.n_seq:
        ap.error("--repeats and --steps must be >= 1 and --eval-tokens > --n-seq")
    if args.threads:
        torch.set_num_threads(args.threads)

    print("Training-step benchmark (fp32, CPU)")
    for line in machine_info():
        print("  " + line)
    print(f"  sizes: d_model={args.d_model}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
          f"batch {args.batch_size} x {args.n_seq}, V={args.vocab:,}; {args.repeats} repeats "
          f"x {args.steps} step(s), eval over {args.eval_tokens:,} tokens")
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, args.vocab, (200_000,), generator=gen)
    eval_stream = torch.randint(0, args.vocab, (args.eval_tokens,), generator=gen)
    rows = bkbench_rows(args, args.vocab, stream)
    if not args.no_reference:
        rows.append(reference_row(args, args.vocab))
    print(f"  peak fp32 GEMM (1024^3 mm): {peak_gemm():.1f} GFLOP/s")
    print()
    sys.stdout.flush()

    interleaved_throughput(rows, args, stream, eval_stream)
    for row in rows:
        # bkbench rows: the objective that trains (flags' loss terms and autocast included)
        row.flops = measure_step_flops(row.model, args.batch_size, args.n_seq, args.vocab,
                                       optimizer=row.optimizer,
                                       compute_loss=getattr(row, "compute_loss", None)).total
        row.gemm_gflop, row.roof = roofline(row, args, stream, args.min_time)
    header = (f"{'model':<34} {'params':>9} {'train tok/s':>22} {'eval tok/s':>24} "
              f"{'eval/train':>10} {'GFLOP/step':>10} {'GFLOP/s':>8} {'roofline':>8} "
              f"{'share':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        step = statistics.median(row.step_times)
        rate = row.flops / step / 1e9
        ratio = statistics.median(row.eval) / statistics.median(row.train)
        params = sum(p.numel() for p in row.model.parameters())
        print(f"{row.name:<34} {params:>9,} {spread(row.train):>22} {spread(row.eval):>24} "
              f"{ratio:>9.2f}x {row.flops / 1e9:>10.2f} {rate:>8.1f} {row.roof:>8.1f} "
              f"{rate / row.roof:>6.0%}")
    print()
    print("GFLOP/step: counted forward+backward + optimizer formula; roofline: GFLOP/s of the "
          "step's own matrix products timed alone; share = GFLOP/s / roofline.")
    for row in rows:
        print(f"  {row.name}: {row.gemm_gflop:.2f} GFLOP of the step are GEMMs "
              f"({row.gemm_gflop / (row.flops / 1e9):.0%} of the counted)")
    print()
    base = next((r for r in rows if r.name == "resnet_bk_baseline"), None)
    flagged = [r for r in rows if r.name.startswith("bk+") or r.name == "resnet_bk_full"]
    if base is not None and flagged:
        print("Against resnet_bk_baseline (medians; selection flags' scoring passes and the "
              "flags' after-training records are not in a step):")
        for row in flagged:
            print(f"  {row.name:<24} train tok/s x{statistics.median(row.train) / statistics.median(base.train):.2f}"
                  f"  eval tok/s x{statistics.median(row.eval) / statistics.median(base.eval):.2f}"
                  f"  GFLOP/step x{row.flops / base.flops:.2f}")
        print()
    sys.stdout.flush()
    if not args.no_side:
        moe_vs_dense(args)
        print()
        lm_loss_chunks(args)
        print()
        optimizer_variants(args)
        print()
    if args.profile:
        profile_steps(rows, args, stream)


if __name__ == "__main__":
    main()
