"""The trainer's optimizer: torch's fused AdamW, the same update as the plain per-tensor loop."""

import torch

from bkbench.config import BenchmarkConfig
from bkbench.models import build_model
from bkbench.train import make_optimizer


def test_fused_adamw_matches_the_plain_update():
    config = BenchmarkConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    model = build_model("transformer", 40, d_model=16, n_layers=1, n_heads=2, n_seq=8)
    plain_model = build_model("transformer", 40, d_model=16, n_layers=1, n_heads=2, n_seq=8)
    plain_model.load_state_dict(model.state_dict())
    ours = make_optimizer(model, config)
    assert ours.defaults["fused"]       # CPU and CUDA have the fused kernel in this torch
    groups = [{"params": [p for p in plain_model.parameters() if p.dim() >= 2],
               "weight_decay": 0.1},
              {"params": [p for p in plain_model.parameters() if p.dim() < 2],
               "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(4):
        x = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (plain_model, plain)):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(step)     # the same dropout masks
            m(x).square().mean().backward()
            opt.step()
    # Adam amplifies rounding differences of near-zero gradients; a wrong weight decay or
    # beta would differ by ~lr*wd*|p| = 2e-5 per step
    for (name, a), b in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
