"""The softmax-classifier module (NumPy) against torch and against the lecture's worked values."""

import math
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from imgcls import softmax as sm  # noqa: E402

ATOL = 1e-6


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _logits(gen, n=7, k=5, scale=3.0):
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * scale


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=0)


# -- against torch --------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_and_log_softmax_match_torch(gen, dim):
    z = _logits(gen)
    _close(sm.softmax(z, dim=dim), F.softmax(z, dim=dim))
    _close(sm.log_softmax(z, dim=dim), F.log_softmax(z, dim=dim))
    _close(sm.sigmoid(z), torch.sigmoid(z))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_log_likelihood_matches_nll_loss(gen, reduction):
    z = _logits(gen)
    y = torch.randint(0, 5, (7,), generator=gen)
    p = F.softmax(z, dim=1)
    expected = F.nll_loss(p.log(), y, reduction=reduction)
    _close(sm.negative_log_likelihood(p, y, reduction=reduction), expected)
    _close(sm.negative_log_likelihood(p, F.one_hot(y, 5), reduction=reduction), expected)


def test_default_reduction_is_mean(gen):
    z = _logits(gen)
    y = torch.randint(0, 5, (7,), generator=gen)
    _close(sm.cross_entropy(z, y), sm.cross_entropy(z, y, reduction="sum") / 7)
    _close(sm.negative_log_likelihood(F.softmax(z, 1), y), F.nll_loss(F.log_softmax(z, 1), y))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(gen, label_smoothing, reduction):
    z = _logits(gen)
    idx = torch.randint(0, 5, (7,), generator=gen)
    soft = F.softmax(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=1)
    for targets in (idx, F.one_hot(idx, 5).double(), soft):
        expected = F.cross_entropy(z, targets, label_smoothing=label_smoothing, reduction=reduction)
        got = sm.cross_entropy(z, targets, label_smoothing=label_smoothing, reduction=reduction)
        _close(got, expected)


@pytest.mark.parametrize("shape", [(9,), (6, 4)])  # binary, multi-label
def test_binary_cross_entropy_matches_torch(gen, shape):
    z = torch.randn(*shape, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(0, 2, shape, generator=gen).double()
    soft_y = torch.rand(*shape, generator=gen, dtype=torch.float64)
    for t in (y, soft_y):
        for r in ("mean", "sum", "none"):
            p = torch.sigmoid(z)
            _close(sm.binary_cross_entropy(p, t, r), F.binary_cross_entropy(p, t, reduction=r))
            _close(sm.binary_cross_entropy_with_logits(z, t, r), F.binary_cross_entropy_with_logits(z, t, reduction=r))


def test_bce_with_logits_is_stable_for_large_logits():
    z = torch.tensor([800.0, -800.0, 800.0, -800.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 800.0, 800.0], dtype=torch.float64)
    _close(sm.binary_cross_entropy_with_logits(z, y, "none"), expected)


# -- the lecture's worked values (Bernoulli likelihood) ---------------------------

Y = [0, 1, 0, 1, 1]


@pytest.mark.parametrize(
    "p, expected",
    [([0.1, 0.8, 0.2, 0.7, 0.9], 0.362880), ([0.1, 0.9, 0.2, 0.7, 0.9], 0.408240)],
)
def test_lecture_likelihood(p, expected):
    got = sm.likelihood(p, Y)
    assert isinstance(got, np.generic) and got.dtype == np.float64 and got.ndim == 0
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert sm.negative_log_likelihood(p, Y, reduction="sum").item() == pytest.approx(-math.log(expected), abs=1e-5)


def test_lecture_likelihood_shrinks_with_more_data():
    y = np.repeat(np.array(Y), 10, axis=0)
    p = np.repeat(np.array([0.1, 0.8, 0.2, 0.7, 0.9]), 10, axis=0)
    got = sm.likelihood(p, y).item()
    assert round(got, 6) == 0.000040  # as printed in the lecture
    # Ten copies multiply the five-sample likelihood by itself ten times: exactly 0.36288**10 = 3.9594e-5.
    assert got == pytest.approx(float(Fraction(36288, 100_000) ** 10), rel=1e-7)
    assert got == pytest.approx(3.9594087e-5, rel=1e-7)


def test_nll_is_minus_log_likelihood(gen):
    p = torch.rand(8, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    y = torch.randint(0, 2, (8,), generator=gen)
    _close(sm.negative_log_likelihood(p, y, "sum"), -torch.log(torch.as_tensor(sm.likelihood(p, y))))
    _close(sm.negative_log_likelihood(p, y), F.binary_cross_entropy(p, y.double()))

    probs = F.softmax(_logits(gen, n=6, k=4), dim=1)
    idx = torch.randint(0, 4, (6,), generator=gen)
    _close(sm.likelihood(probs, idx), probs[torch.arange(6), idx].prod())
    _close(sm.likelihood(probs, idx), sm.likelihood(probs, F.one_hot(idx, 4)))
    _close(sm.negative_log_likelihood(probs, idx, "sum"), -torch.log(torch.as_tensor(sm.likelihood(probs, idx))))


def test_nll_equals_cross_entropy_for_one_hot(gen):
    z = _logits(gen)
    idx = torch.randint(0, 5, (7,), generator=gen)
    one_hot = F.one_hot(idx, 5).double()
    for reduction in ("mean", "sum", "none"):
        nll = sm.negative_log_likelihood(sm.softmax(z), one_hot, reduction)
        _close(nll, sm.cross_entropy(z, one_hot, reduction=reduction))
        _close(nll, sm.cross_entropy(z, idx, reduction=reduction))


def test_binary_is_softmax_over_zero_and_logit(gen):
    z = torch.randn(6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    two_class = torch.stack([torch.zeros_like(z), z], dim=1)
    _close(sm.softmax(two_class)[:, 1], sm.sigmoid(z))
    _close(sm.cross_entropy(two_class, y), sm.binary_cross_entropy_with_logits(z, y))


# -- numerics and input types ----------------------------------------------------


def test_log_softmax_is_stable():
    out = sm.log_softmax([1000.0, 0.0])
    assert np.isfinite(out).all()
    _close(out, torch.tensor([0.0, -1000.0], dtype=torch.float64))
    _close(sm.softmax([1000.0, 0.0]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    _close(sm.cross_entropy([[1000.0, 0.0]], [1]), torch.tensor(1000.0, dtype=torch.float64))


def test_softmax_rows_sum_to_one(gen):
    z = _logits(gen, n=50, k=10, scale=50.0)
    p = sm.softmax(z)
    assert ((p >= 0) & (p <= 1)).all()
    _close(p.sum(axis=1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    _close(sm.softmax(z + 123.0), p)  # shift invariance


def test_input_types():
    assert sm.softmax([1, 2, 3]).dtype == np.float64  # plain numbers -> float64
    assert sm.softmax(np.array([1.0, 2.0])).dtype == np.float64
    assert sm.softmax(np.array([1.0, 2.0], np.float32)).dtype == np.float32  # float arrays keep their dtype
    assert sm.softmax(torch.tensor([1.0, 2.0])).dtype == np.float32  # so do tensors
    assert sm.softmax(torch.tensor([1, 2])).dtype == np.float64  # integer tensors -> float64
    assert sm.softmax(torch.tensor([1.0, 2.0], requires_grad=True)).dtype == np.float32  # detached, not an error
    _close(sm.softmax(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)), F.softmax(torch.tensor([1.0, 2.0]), 0))
    assert sm.likelihood(torch.tensor([0.5, 0.25]), torch.tensor([True, False])).item() == pytest.approx(0.375)
    for out in (sm.softmax(torch.tensor([1.0, 2.0])), sm.cross_entropy([[1.0, 2.0]], [1])):
        assert isinstance(out, (np.ndarray, np.generic))  # NumPy out, whatever came in


def test_module_runs_without_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from imgcls import softmax as sm\n"
            "print(round(float(sm.likelihood([0.1, 0.8, 0.2, 0.7, 0.9], [0, 1, 0, 1, 1])), 6))\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.36288"


# -- bad inputs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sm.likelihood([0.1, 0.5], [0, 1, 1]), "shape mismatch"),
        (lambda: sm.likelihood([0.1, 1.5], [0, 1]), r"probs must be in \[0, 1\]"),
        (lambda: sm.likelihood([-0.1, 0.5], [0, 1]), r"probs must be in \[0, 1\]"),
        (lambda: sm.likelihood([0.1, float("nan")], [0, 1]), r"probs must be in \[0, 1\]"),
        (lambda: sm.likelihood([0.1, 0.5], [0, 2]), r"y must be in \[0, 1\]"),
        (lambda: sm.likelihood(np.full((2, 3), 1 / 3), [0, 1, 2]), "2 samples"),
        (lambda: sm.likelihood(np.full((2, 3), 1 / 3), [0, 3]), "class indices"),
        (lambda: sm.likelihood(np.full((2, 3), 1 / 3), [0.0, 1.0]), "integers"),
        (lambda: sm.likelihood(np.full((2, 3), 1 / 3), np.eye(2)), "shape mismatch"),
        (lambda: sm.likelihood(np.full((2, 2, 2), 0.5), [0, 1]), r"\(N,\) or \(N, K\)"),
        (lambda: sm.negative_log_likelihood([0.5], [1], reduction="avg"), "reduction"),
        (lambda: sm.cross_entropy([1.0, 2.0], [0, 1]), r"\(N, K\)"),
        (lambda: sm.cross_entropy([[1.0, 2.0]], [0], label_smoothing=1.5), "label_smoothing"),
        (lambda: sm.binary_cross_entropy([0.2, 1.2], [0, 1]), r"probs must be in \[0, 1\]"),
        (lambda: sm.binary_cross_entropy([0.2, 0.3], [0, 1, 1]), "shape mismatch"),
        (lambda: sm.binary_cross_entropy_with_logits([0.2, 3.0], [0, -1]), r"y must be in \[0, 1\]"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
