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


def _child_peak(batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(batch)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rss_figures_are_sane():
    assert rss_bytes() > 1 << 20
    assert peak_rss_bytes() >= rss_bytes() * 0.9


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
