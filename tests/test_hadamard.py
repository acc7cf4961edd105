"""Tests for spinlearn.hadamard: constructions, fast transform, random rotations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spinlearn import hadamard as hd
from spinlearn.hadamard import (
    NoHadamardError,
    decompose_order,
    fast_hadamard_transform,
    hadamard_matrix,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    supported_order,
)

BASE_ORDERS = [1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 148, 156, 172]
ORDERS = sorted({k << m for k in BASE_ORDERS for m in range(3)})
UNSUPPORTED = [3, 6, 30, 92, 116]  # 3, 6, 30: no Hadamard exists; 92, 116: no construction here


def _sylvester_reference(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", ORDERS)
def test_required_orders_orthogonal_and_fast_transform_matches_dense(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() <= 1e-10

    x = torch.randn(3, n, generator=_gen(n), dtype=torch.float64)
    y = fast_hadamard_transform(x)
    assert (y - x @ h).abs().max() <= 1e-10
    assert (fast_hadamard_transform(x, inverse=True) - x @ h.T).abs().max() <= 1e-10
    assert (fast_hadamard_transform(y, inverse=True) - x).abs().max() <= 1e-10


@pytest.mark.parametrize("n", [40, 12 * 8, 28 * 4, 172 * 2, 1904])
def test_dense_is_kron_of_base_and_sylvester(n: int) -> None:
    k, p = decompose_order(n)
    assert k * p == n and p & (p - 1) == 0
    if n == 40:
        assert (k, p) == (20, 2)  # the smallest known base is used, deterministically
    base = hadamard_matrix(k) * math.sqrt(k)
    expected = np.kron(base.round().numpy(), _sylvester_reference(p)) / math.sqrt(n)
    assert np.abs(hadamard_matrix(n).numpy() - expected).max() <= 1e-15


def test_product_base_order() -> None:
    # 1904 = 16 * 119: no Paley order divides it with a power-of-two cofactor, a Kronecker product does.
    n = 1904
    k, _ = decompose_order(n)
    assert hd._base_recipe(k)[0] == "kron"
    h = hadamard_matrix(n)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() <= 1e-10
    x = torch.randn(2, n, generator=_gen(0), dtype=torch.float64)
    assert (fast_hadamard_transform(x) - x @ h).abs().max() <= 1e-10


@pytest.mark.parametrize("q", [3, 5, 9, 25, 27, 49, 81, 125, 243])
def test_paley_over_prime_power_fields(q: int) -> None:
    h = hd._paley(q)  # 9, 25, ... need GF(p^k) arithmetic for the quadratic character
    n = q + 1 if q % 4 == 3 else 2 * (q + 1)
    assert h.shape == (n, n) and set(np.unique(h)) == {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("k", sorted(hd._GOETHALS_SEIDEL_ROWS))
def test_goethals_seidel_rows_have_zero_total_autocorrelation(k: int) -> None:
    rows = [np.array([1 if c == "+" else -1 for c in r]) for r in hd._GOETHALS_SEIDEL_ROWS[k]]
    v = len(rows[0])
    assert 4 * v == k
    for shift in range(1, v):
        assert sum(int(a @ np.roll(a, shift)) for a in rows) == 0


def test_deterministic_and_returns_fresh_tensor() -> None:
    a = hadamard_matrix(172)
    a.zero_()  # must not corrupt the cache
    b, c = hadamard_matrix(172), hadamard_matrix(172)
    assert torch.equal(b, c) and b.abs().min() > 0


def test_dtype_and_device_arguments() -> None:
    h32 = hadamard_matrix(48, dtype=torch.float32, device="cpu")
    assert h32.dtype == torch.float32
    assert torch.allclose(h32.double(), hadamard_matrix(48), atol=1e-7)


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_orders_raise(n: int) -> None:
    assert not supported_order(n)
    with pytest.raises(NoHadamardError, match=rf"\b{n}\b") as info:
        hadamard_matrix(n)
    assert isinstance(info.value, ValueError) and "Paley" in str(info.value)
    with pytest.raises(NoHadamardError):
        fast_hadamard_transform(torch.zeros(2, n))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="0"):
        decompose_order(0)
    decompose_order(12)  # cached now: a float must still be refused
    with pytest.raises(TypeError, match="int"):
        hadamard_matrix(12.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        supported_order(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        fast_hadamard_transform(torch.ones(2, 12, dtype=torch.int64))


def test_supported_real_sizes() -> None:
    assert decompose_order(4096) == (1, 4096)
    assert decompose_order(11008) == (172, 64)
    assert decompose_order(13824) == (108, 128)
    assert decompose_order(14336) == (28, 512)
    assert decompose_order(18944) == (148, 128)


def test_fast_transform_leading_dims_and_float32() -> None:
    n = 20 * 64
    x = torch.randn(2, 3, n, generator=_gen(1))
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = x.double() @ hadamard_matrix(n)
    assert (y.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_transform_half_types(dtype: torch.dtype) -> None:
    n = 108 * 4
    x = torch.randn(4, n, generator=_gen(2)).to(dtype)
    y = fast_hadamard_transform(x)
    assert y.dtype == dtype
    ref = x.double() @ hadamard_matrix(n)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert ((y.double() - ref).abs() <= tol * (ref.abs() + 1)).all()


def test_fast_transform_autograd() -> None:
    n = 12 * 2
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True, generator=_gen(3))
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,))
    assert torch.autograd.gradcheck(lambda t: fast_hadamard_transform(t, inverse=True), (x,))

    n = 172 * 2
    h = hadamard_matrix(n)
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True, generator=_gen(4))
    w = torch.randn(3, n, dtype=torch.float64, generator=_gen(5))
    (fast_hadamard_transform(x) * w).sum().backward()
    assert (x.grad - w @ h.T).abs().max() <= 1e-10


def test_random_hadamard_matrix() -> None:
    n = 28 * 2
    a = random_hadamard_matrix(n, _gen(0))
    assert torch.equal(a, random_hadamard_matrix(n, _gen(0)))
    assert not torch.equal(a, random_hadamard_matrix(n, _gen(1)))
    assert (a @ a.T - torch.eye(n, dtype=torch.float64)).abs().max() <= 1e-10
    # a = diag(s) @ H: a @ H^T is diagonal with a +-1 diagonal holding both signs.
    s = a @ hadamard_matrix(n).T
    diag = torch.diagonal(s)
    assert (s - torch.diag(diag)).abs().max() <= 1e-10
    assert torch.allclose(diag.abs(), torch.ones(n, dtype=torch.float64))
    assert (diag > 0).any() and (diag < 0).any()
    assert random_hadamard_matrix(n, _gen(0), dtype=torch.float32).dtype == torch.float32


def test_random_orthogonal_matrix() -> None:
    n = 64
    q = random_orthogonal_matrix(n, _gen(0))
    assert torch.equal(q, random_orthogonal_matrix(n, _gen(0)))
    assert not torch.equal(q, random_orthogonal_matrix(n, _gen(1)))
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() <= 1e-12
    assert q.abs().max() - q.abs().min() > 0.1  # not a Hadamard: magnitudes differ
    # Sign correction: q^T g is the R of g's QR with a positive diagonal (the unique such QR).
    g = torch.randn(n, n, generator=_gen(0), dtype=torch.float64)
    r = q.T @ g
    assert (torch.diagonal(r) > 0).all() and (torch.tril(r, -1).abs() <= 1e-10).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_transform_cuda() -> None:
    n = 172 * 64
    x = torch.randn(4, n, generator=_gen(6), dtype=torch.float64)
    y = fast_hadamard_transform(x.cuda()).cpu()
    assert (y - fast_hadamard_transform(x)).abs().max() <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("n", [4096, 11008, 13824, 14336, 18944])
def test_real_model_sizes(n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float32)  # float32 keeps the 18944 matrix at 1.4 GB
    assert h.abs().sub_(1 / math.sqrt(n)).abs_().max() <= 1e-7
    assert (h[:32] @ h.T - torch.eye(n)[:32]).abs().max() <= 1e-5
    x = torch.randn(4, n, generator=_gen(n), dtype=torch.float64)
    assert (fast_hadamard_transform(x.float()) - x.float() @ h).abs().max() <= 1e-4
    del h
    # float64 reference without the dense n x n matrix: x @ kron(A, B) = A^T X B for X = x.view(K, P).
    k, p = decompose_order(n)
    a, b = hadamard_matrix(k), torch.as_tensor(_sylvester_reference(p) / math.sqrt(p))
    ref = (a.T @ x.view(4, k, p) @ b).reshape(4, n)
    y = fast_hadamard_transform(x)
    assert (y - ref).abs().max() <= 1e-10
    assert (fast_hadamard_transform(y, inverse=True) - x).abs().max() <= 1e-10
