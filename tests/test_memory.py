"""Peak-memory primitives, and the CPU figure measured in a fresh child process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bkbench.metrics import PeakMemory, peak_rss_bytes, reset_peak_rss, rss_bytes

_CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from bkbench.metrics import PeakMemory
from bkbench.models import build_model
torch.set_num_threads(1)
batch = int(sys.argv[1])
with PeakMemory("cpu") as mem:
    torch.manual_seed(0)
    model = build_model("transformer", 5000, d_model=64, n_layers=1, n_heads=4, n_seq=64)
    idx = torch.randint(0, 5000, (batch, 65))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 5000), idx[:, 1:].reshape(-1))
    loss.backward()
print(json.dumps(mem.to_dict()))
"""


# Two models with the same parameters and activations; "bk" also calls the BK-Core once per
# forward (on a (B, T) slice: a negligible activation). With the warm-up before the baseline
# the one-time set-up of the BK-Core (imports, custom ops, numba) is charged to neither.
_WARM_CHILD = r"""
import json, sys, torch
import torch.nn as nn
import torch.nn.functional as F
from bkbench.config import BenchmarkConfig
from bkbench.metrics import PeakMemory
from bkbench.metrics.memory import release_freed_memory
from bkbench.ops.bk_core import resolvent_diag
from bkbench.train import make_optimizer
from bkbench.warmup import warm_up
torch.set_num_threads(1)
kind, V, T = sys.argv[1], 3000, 32

class Model(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.fc = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, vocab)

    def forward(self, idx):
        h = F.gelu(self.fc(self.emb(idx)))
        if kind == "bk":
            g = resolvent_diag(h[..., 0].contiguous(), analytic_gradient=True)
            h = h + g.real.unsqueeze(-1)
        return self.lm_head(h)

config = BenchmarkConfig(model_name="transformer_x", n_seq=T, batch_size=16)
warm_up(Model(16), config, "cpu")
release_freed_memory()
with PeakMemory("cpu") as mem:
    torch.manual_seed(0)
    model = Model(V)
    opt = make_optimizer(model, config)
    for _ in range(2):
        idx = torch.randint(0, V, (16, T + 1))
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, V), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.eval()(idx[:, :-1])
print(json.dumps(mem.to_dict()))
"""


@pytest.mark.slow
def test_one_time_set_up_is_not_charged_to_the_model_that_first_uses_it():
    # A single child's figure varies by up to ~13 MiB from run to run (allocator arenas, and
    # whatever else the machine is doing), so each kind is measured three times, interleaved,
    # and their medians compared; the effect guarded against is ~50 MiB.
    samples = {"plain": [], "bk": []}
    for _ in range(3):
        for kind in samples:
            out = subprocess.run([sys.executable, "-c", _WARM_CHILD, kind], capture_output=True,
                                 text=True, timeout=120, check=True)
            samples[kind].append(json.loads(out.stdout.strip().splitlines()[-1])["increase_bytes"])
    if not reset_peak_rss():
        pytest.skip("peak RSS cannot be reset here")
    peaks = {kind: sorted(values)[1] for kind, values in samples.items()}
    assert peaks["plain"] > 2 * 2**20                         # the test measures something
    # measured here: 27-39 MiB for either model from run to run with the warm-up; without
    # it the BK model's first call added ~50 MiB (and the shared set-up ~90 MiB to both)
    assert abs(peaks["bk"] - peaks["plain"]) < 16 * 2**20, samples


def _child_peak(batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(batch)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rss_follows_an_allocation_up_and_down_and_the_peak_keeps_it():
    """128 MiB touched: the current RSS rises by about that and falls back when it is freed
    (a large block is its own mapping, returned to the OS); the peak keeps the high point. A
    figure that did not track this process's pages (a constant, the lifetime peak as the
    current RSS, another process's) fails."""
    size = 128 * 2**20
    before = rss_bytes()
    x = torch.ones(size // 4)                          # every page written
    during = rss_bytes()
    peak_during = peak_rss_bytes()
    del x
    after = rss_bytes()
    assert 0.9 * size < during - before < 1.25 * size
    assert during - after > 0.9 * size
    assert peak_during >= during and peak_rss_bytes() >= before + 0.9 * size


def test_peak_memory_cpu_sees_a_large_allocation():
    supported = reset_peak_rss()
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4 * 4)         # 256 MiB, every page touched
        del x
    assert mem.baseline_bytes > 0 and mem.peak_bytes >= mem.baseline_bytes
    if not supported:
        pytest.skip("peak RSS cannot be reset here; only the lifetime peak is available")
    assert mem.increase_bytes > 200 * 2**20
    assert "RSS" in mem.method
    assert mem.to_dict()["increase_mb"] == pytest.approx(mem.increase_bytes / 2**20)


def test_cpu_peak_grows_with_the_batch():
    small, large = _child_peak(4), _child_peak(64)
    # logits, log-probabilities and their gradients: ~64*64*5000*4 bytes each at batch 64
    assert large["increase_bytes"] > small["increase_bytes"] + 100 * 2**20
    assert small["increase_bytes"] > 0
    assert large["method"] == small["method"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as mem:
        x = torch.ones(2**24, device="cuda")
        del x
    assert mem.increase_bytes >= 2**26
    assert "max_memory_allocated" in mem.method
