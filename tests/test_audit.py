"""The causality audit: passes causal models bit for bit, catches every kind of leak."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bkbench.audit import audit_causality, default_positions, format_audit
from bkbench.models import build_model
from bkbench.models.common import LanguageModel
from bkbench.models.transformer import CausalSelfAttention, TransformerLM

V = 50


def tiny_transformer(**kw) -> TransformerLM:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=2, n_heads=4, n_seq=24, dropout=0.2)
    cfg.update(kw)
    return build_model("transformer", V, **cfg)


class FutureEmbeddingLM(LanguageModel):
    """Adds ``scale`` times the sum of the embeddings of all later tokens: a leak of any size."""

    def __init__(self, scale: float = 1.0, n_seq: int = 24):
        super().__init__()
        self.n_seq = n_seq
        self.scale = scale
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, idx):
        e = self.emb(idx)
        later = e.flip(1).cumsum(1).flip(1) - e   # sum over positions > t
        return self.head(e + self.scale * later)


class NonCausalAttention(CausalSelfAttention):
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (u.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)   # the bug under test
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class BatchNormOverTimeLM(LanguageModel):
    """Causal in eval (running statistics) but leaky in train mode (batch statistics over T)."""

    def __init__(self, n_seq: int = 24):
        super().__init__()
        self.n_seq = n_seq
        self.emb = nn.Embedding(V, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, V)

    def forward(self, idx):
        h = self.norm(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def test_transformer_passes_bit_for_bit_in_eval_and_train():
    model = tiny_transformer()
    audit = audit_causality(model, V)
    assert audit.causal and audit.max_leak == 0.0 and audit.threshold == 0.0
    assert set(audit.modes) == {"eval", "train"}
    assert audit.positions == default_positions(24) == [1, 6, 12, 18, 23]
    assert audit.perturbations == 2 * 2 * 5
    assert all(m.responsive for m in audit.modes.values())
    assert format_audit(audit).startswith("CAUSAL: max leak 0.0 over 20 perturbations at positions "
                                          "[1, 6, 12, 18, 23] (eval, train)")


def test_train_mode_audit_really_runs_dropout():
    # train-mode forwards drop (they differ from eval mode, and from another step's masks):
    # the audit's train mode is not vacuous
    from bkbench.models.dropout import dropout_key
    model = tiny_transformer().train()
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        train_out = model(idx)
        with dropout_key(0, 1, None):
            assert not torch.equal(train_out, model(idx))
        assert not torch.equal(train_out, model.eval()(idx))
    assert audit_causality(model.train(), V, modes=("train",)).causal


def test_future_embedding_leak_is_caught_even_when_tiny():
    for scale in (1.0, 1e-6):
        audit = audit_causality(FutureEmbeddingLM(scale), V)
        assert not audit.causal, scale
        assert 0 < audit.max_leak < (10 if scale == 1.0 else 1e-3)
        assert format_audit(audit).startswith("NOT CAUSAL: max leak")


def test_non_causal_attention_is_caught():
    model = tiny_transformer(dropout=0.0)
    for block in model.blocks:
        leaky = NonCausalAttention(model.config)
        leaky.load_state_dict(block.attn.state_dict())
        block.attn = leaky
    audit = audit_causality(model, V)
    assert not audit.causal
    assert audit.modes["eval"].max_leak > 1e-4 and audit.modes["train"].max_leak > 1e-4


def test_train_only_leak_is_caught_and_state_is_restored():
    model = BatchNormOverTimeLM()
    with torch.no_grad():
        model.norm.running_mean.fill_(0.5)
    running_mean = model.norm.running_mean.clone()
    tracked = model.norm.num_batches_tracked.clone()
    model.eval()
    rng = torch.get_rng_state()
    audit = audit_causality(model, V)
    assert audit.modes["eval"].max_leak == 0.0
    assert audit.modes["train"].max_leak > 0.0
    assert not audit.causal
    assert "train:" in format_audit(audit)
    # the model's mode, its buffers and the caller's RNG are untouched
    assert not model.training
    assert torch.equal(model.norm.running_mean, running_mean)
    assert torch.equal(model.norm.num_batches_tracked, tracked)
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_flag_restored_after_audit():
    model = tiny_transformer().train()
    audit_causality(model, V, modes=("eval",))
    assert model.training


def test_non_finite_logits_fail():
    class NaNLM(FutureEmbeddingLM):
        def forward(self, idx):
            return super().forward(idx) * float("nan")

    audit = audit_causality(NaNLM(0.0), V, modes=("eval",))
    assert not audit.causal
    assert "non-finite" in format_audit(audit)


def test_forward_runs_without_grad_and_to_dict_is_json():
    class NoGradOnly(FutureEmbeddingLM):
        def forward(self, idx):
            assert not torch.is_grad_enabled()
            return super().forward(idx)

    audit = audit_causality(NoGradOnly(0.0), V, seq_len=10, num_sequences=3, positions=[9, 2, 2])
    assert audit.causal and audit.positions == [2, 9] and audit.seq_len == 10
    d = json.loads(json.dumps(audit.to_dict()))
    assert d["causal"] is True and d["perturbations"] == 2 * 3 * 2
    assert d["modes"]["eval"]["leak_by_position"] == {"2": 0.0, "9": 0.0}


def test_vacuous_trials_are_flagged():
    class ConstantLM(FutureEmbeddingLM):
        def forward(self, idx):
            return torch.zeros(*idx.shape, V)

    audit = audit_causality(ConstantLM(), V, modes=("eval",))
    assert audit.causal and not audit.modes["eval"].responsive
    assert "warning" in format_audit(audit)


def test_argument_errors():
    model = FutureEmbeddingLM()
    with pytest.raises(ValueError, match="positions"):
        audit_causality(model, V, positions=[0])
    with pytest.raises(ValueError, match="positions"):
        audit_causality(model, V, positions=[24])
    with pytest.raises(ValueError, match="mode"):
        audit_causality(model, V, modes=("test",))
    with pytest.raises(ValueError, match="vocab_size"):
        audit_causality(model, 1)
    with pytest.raises(ValueError, match="seq_len"):
        audit_causality(nn.Linear(2, 2), V)


def reference_leaks(model, seqs, perturbed, mode, forward_seed):
    """The plain audit: one forward per changed sequence, the base in the same (1, T) shape."""
    model.train(mode == "train")
    leaks = {}
    with torch.no_grad():
        for k, changed in perturbed.items():
            worst = 0.0
            for i in range(seqs.shape[0]):
                torch.manual_seed(forward_seed)
                base = model(seqs[i:i + 1])
                torch.manual_seed(forward_seed)
                out = model(changed[i:i + 1])
                worst = max(worst, float((out[:, :k].double() - base[:, :k].double()).abs().max()))
            leaks[k] = worst
    return leaks


def audit_inputs(seq_len, num_sequences, positions, seed):
    # the same draws as audit_causality makes
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, V, (num_sequences, seq_len), generator=gen)
    perturbed = {}
    for k in positions:
        changed = seqs.clone()
        changed[:, k] = (changed[:, k] + torch.randint(1, V, (num_sequences,), generator=gen)) % V
        perturbed[k] = changed
    return seqs, perturbed


@pytest.mark.parametrize("leaky", [False, True])
def test_batched_audit_matches_the_plain_one(leaky):
    # transformer with or without a non-causal attention (features path), and the future-embedding
    # model (plain logits path): batched leaks agree with one-sequence-at-a-time forwards
    model = tiny_transformer(dropout=0.2)
    if leaky:
        for block in model.blocks:
            bad = NonCausalAttention(model.config)
            bad.load_state_dict(block.attn.state_dict())
            block.attn = bad
    for m in (model, FutureEmbeddingLM(1e-3 if leaky else 0.0)):
        audit = audit_causality(m, V, num_sequences=3, seed=5)
        seqs, perturbed = audit_inputs(24, 3, audit.positions, 5)
        for mode in ("eval", "train"):
            ref = reference_leaks(m, seqs, perturbed, mode, forward_seed=6)
            got = audit.modes[mode].leak_by_position
            assert set(got) == set(ref)
            for k in ref:
                if not leaky:
                    assert got[k] == ref[k] == 0.0
                elif mode == "eval":  # in train mode the masks depend on the batch shape
                    assert got[k] == pytest.approx(ref[k], rel=1e-3), (type(m).__name__, k)
                else:
                    assert (got[k] > 0) == (ref[k] > 0), (type(m).__name__, k)
        assert audit.causal is not leaky


def test_features_shortcut_reports_logit_leaks_like_the_full_forward(monkeypatch):
    import bkbench.audit as audit_module

    model = tiny_transformer(dropout=0.0)
    for block in model.blocks:
        bad = NonCausalAttention(model.config)
        bad.load_state_dict(block.attn.state_dict())
        block.attn = bad
    short = audit_causality(model, V)
    monkeypatch.setattr(audit_module, "_head_split", lambda m: None)
    full = audit_causality(model, V)
    for mode in ("eval", "train"):
        a, b = short.modes[mode].leak_by_position, full.modes[mode].leak_by_position
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7)
    # a non-finite head cannot hide behind finite features
    monkeypatch.undo()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    assert "non-finite" in format_audit(audit_causality(model, V))
