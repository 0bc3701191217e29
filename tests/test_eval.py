"""Evaluation: coverage (every target once), uniform-logit perplexity, stride, error handling."""

import math

import pytest
import torch
import torch.nn as nn

from bkbench.eval import _windows, evaluate
from bkbench.models import build_model


class UniformLM(nn.Module):
    """Zero logits: every token has probability 1/V, so perplexity must equal V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size) + 0 * self.dummy


class RecordingLM(nn.Module):
    """Logits that put all mass on a fixed token; records every (input window) it was fed."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = []
        self.modes = []

    def forward(self, idx):
        self.calls.append(idx.clone())
        self.modes.append(self.training)
        return torch.zeros(*idx.shape, self.vocab_size)


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 64, None), (1001, 64, 16), (37, 64, None),
                                              (500, 7, 3), (1, 5, None), (64, 64, 64)])
def test_windows_score_every_target_once(n, seq_len, stride):
    s = seq_len if stride is None else stride
    scored = []
    for start, end, first in _windows(n, seq_len, s):
        assert end - start <= seq_len
        assert start <= first < end
        assert first - start <= seq_len - s or start == 0  # extra context bounded
        scored.extend(range(first, end))
    assert scored == list(range(n))


@pytest.mark.parametrize("vocab", [10, 1000, 33278])
@pytest.mark.parametrize("stride", [None, 8])
def test_uniform_logits_perplexity_equals_vocab_size(vocab, stride):
    tokens = torch.randint(0, vocab, (777,))
    res = evaluate(UniformLM(vocab), tokens, seq_len=32, batch_size=5, stride=stride)
    assert res.num_tokens == 777
    assert math.isclose(res.perplexity, vocab, rel_tol=1e-5)
    assert math.isclose(res.bits_per_token, math.log2(vocab), rel_tol=1e-5)


def test_every_token_is_a_target_once_and_first_follows_bos():
    torch.manual_seed(0)
    vocab = 50
    tokens = torch.randint(1, vocab, (203,))
    tokens[-1] = 0  # the split ends with <eos> (id 0), which is the default leading token
    model = RecordingLM(vocab)
    res = evaluate(model, tokens, seq_len=16, batch_size=4)
    assert res.num_tokens == tokens.numel()
    fed = torch.cat([c.reshape(-1) for c in sorted(model.calls, key=lambda c: -c.shape[1])])
    # without stride each input position appears once: inputs are <eos> + tokens[:-1]
    expected = torch.cat([torch.tensor([0]), tokens[:-1]])
    assert sorted(fed.tolist()) == sorted(expected.tolist())
    assert model.calls[0][0, 0].item() == 0
    assert not any(model.modes), "evaluation must run in eval mode"


def test_eval_restores_training_mode_and_needs_no_grad():
    model = build_model("transformer", 30, d_model=16, n_layers=1, n_heads=2, n_seq=16)
    model.train()
    res = evaluate(model, torch.randint(0, 30, (100,)), seq_len=16, batch_size=3)
    assert model.training
    assert res.num_tokens == 100


def test_stride_gives_more_context_and_same_count():
    torch.manual_seed(0)
    model = build_model("transformer", 40, d_model=16, n_layers=1, n_heads=2, n_seq=32, dropout=0.0)
    tokens = torch.randint(0, 40, (300,))
    plain = evaluate(model, tokens, seq_len=32, batch_size=4)
    strided = evaluate(model, tokens, seq_len=32, batch_size=4, stride=8)
    assert plain.num_tokens == strided.num_tokens == 300
    assert strided.stride == 8 and plain.stride is None
    assert plain.loss != strided.loss  # different contexts, different numbers


def test_stride_equal_to_seq_len_matches_plain_evaluation():
    torch.manual_seed(1)
    model = build_model("transformer", 40, d_model=16, n_layers=1, n_heads=2, n_seq=32, dropout=0.0)
    tokens = torch.randint(0, 40, (250,))
    a = evaluate(model, tokens, seq_len=32, batch_size=4)
    b = evaluate(model, tokens, seq_len=32, batch_size=7, stride=32)
    assert a.num_tokens == b.num_tokens
    assert math.isclose(a.total_nll, b.total_nll, rel_tol=1e-6)


def test_eval_matches_direct_loss_on_one_window():
    torch.manual_seed(2)
    model = build_model("transformer", 25, d_model=16, n_layers=1, n_heads=2, n_seq=64, dropout=0.0)
    model.eval()
    tokens = torch.randint(0, 25, (40,))
    res = evaluate(model, tokens, seq_len=64, batch_size=1, bos_id=3)
    inputs = torch.cat([torch.tensor([3]), tokens[:-1]])[None]
    with torch.no_grad():
        direct = nn.functional.cross_entropy(model(inputs)[0], tokens)
    assert math.isclose(res.loss, direct.item(), rel_tol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=0, batch_size=1), "positive"),
    (dict(seq_len=8, batch_size=1, stride=9), "stride"),
    (dict(seq_len=8, batch_size=1, stride=0), "stride"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(UniformLM(5), torch.arange(5), **kwargs)


def test_nonfinite_logits_are_an_error():
    class NaNLM(UniformLM):
        def forward(self, idx):
            return torch.full((*idx.shape, self.vocab_size), float("nan"))
    with pytest.raises(FloatingPointError):
        evaluate(NaNLM(5), torch.arange(5), seq_len=4, batch_size=2)
