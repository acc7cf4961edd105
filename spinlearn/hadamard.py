"""Hadamard matrices, random Hadamard / orthogonal matrices, and a fast Walsh-Hadamard transform.

Conventions
-----------
* Row-vector convention: a rotation ``H`` acts as ``x @ H`` on the last dimension of ``x``.
* :func:`hadamard_matrix` returns the *normalized* matrix (entries ``+-1/sqrt(n)``, ``H @ H.T = I``).
* An order ``n`` is decomposed as ``n = K * 2**m`` (:func:`decompose_order`) and the matrix is exactly
  ``kron(H_K, H_{2^m})`` (both normalized), where ``H_{2^m}`` is Sylvester's matrix and ``H_K`` a "base"
  matrix. The largest power of two that leaves a constructible ``K`` is used, so the choice is
  deterministic, and :func:`fast_hadamard_transform` computes exactly the same matrix in O(n log n).

Base orders ``K`` (integer +-1 constructions, verified ``H H^T = K I`` when built):
* Paley I: ``K = q + 1`` for a prime power ``q = 3 mod 4``;
* Paley II: ``K = 2 (q + 1)`` for a prime power ``q = 1 mod 4``;
* Goethals-Seidel arrays from four circulant blocks for ``K`` in {156, 172} (Llama widths 11008 = 172*64);
* Kronecker products of two of the above (e.g. 144 = 12 * 12).
Orders such as 92 or 116 are not reachable this way and raise :class:`NoHadamardError`.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

__all__ = [
    "NoHadamardError",
    "hadamard_matrix",
    "supported_order",
    "decompose_order",
    "fast_hadamard_transform",
    "random_hadamard_matrix",
    "random_orthogonal_matrix",
]

SUPPORTED_FORMS = (
    "n = K * 2^m with K = 1, K = q+1 (q = 3 mod 4 prime power, Paley I), K = 2(q+1) "
    "(q = 1 mod 4 prime power, Paley II), K in {156, 172} (Goethals-Seidel), or K a product of two such K"
)

# First rows of four circulant blocks whose periodic autocorrelations sum to zero (so the
# Goethals-Seidel array below is Hadamard). Found by a search over sequences that are constant on
# the orbits of a multiplicative subgroup of Z_v (v=43: {1,6,7,36,37,42}, symmetric = Williamson;
# v=39: {1,5,8,25}); _base_hadamard re-verifies them every time they are built.
_GOETHALS_SEIDEL_ROWS: dict[int, tuple[str, str, str, str]] = {
    156: (
        "-+-+++-++---+--+-++++++-++-+----+--++--",
        "++--++-++---+-+--++++++--+-+---++-++--+",
        "--+-+--+--++++--++++++++--++++--+--+-+-",
        "+-+-+-++-++++---++++++++---++++-++-+-+-",
    ),
    172: (
        "---+++--++-+-+-+--++++++++--+-+-+-++--+++--",
        "+-++-----++++-+-+++-++++-+++-+-++++-----++-",
        "+++++-++----+-++--++-++-++--++-+----++-++++",
        "++-+-++++-+--+--+++--++--+++--+--+-++++-+-+",
    ),
}

# Sylvester blocks applied per stage of the fast transform: large enough for BLAS to be efficient,
# small enough that the total work stays O(n log n) (each stage costs `block` MACs per element);
# 64..256 measured about equal on CPU.
_MAX_BLOCK = 128


class NoHadamardError(ValueError):
    """No Hadamard matrix of the requested order is known to this module."""


# ---------------------------------------------------------------------------------------------
# Integer constructions
# ---------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial a modulo monic f over GF(p); coefficients low to high."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible_poly(p: int, k: int) -> list[int]:
    """The first (in lexicographic order) monic irreducible polynomial of degree k over GF(p)."""
    for low in itertools.product(range(p), repeat=k):
        f = list(low) + [1]
        divisors = (
            list(g) + [1] for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d)
        )
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_residue_matrix(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[i, j] = chi(x_i - x_j) of GF(q), chi the quadratic character."""
    p, k = _prime_power(q)  # type: ignore[misc]
    # Element i of GF(p^k) is the polynomial whose coefficients are the base-p digits of i.
    digits = np.array([[(i // p**d) % p for d in range(k)] for i in range(q)])
    if k == 1:
        squares = {(i * i) % q for i in range(q)}
    else:
        f = _irreducible_poly(p, k)
        remainders = (_poly_mod(np.convolve(row, row).tolist(), f, p) for row in digits)
        squares = {sum(c * p**d for d, c in enumerate(r)) for r in remainders}
    chi = np.array([0 if i == 0 else (1 if i in squares else -1) for i in range(q)])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ (p ** np.arange(k))]


def _paley(q: int) -> np.ndarray:
    """Paley I (q = 3 mod 4, order q+1) or Paley II (q = 1 mod 4, order 2(q+1)) Hadamard matrix."""
    jac = _quadratic_residue_matrix(q)
    ones = np.ones((q, 1), dtype=np.int64)
    if q % 4 == 3:  # skew conference matrix S, H = I + S
        s = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [-ones, jac]])
        return np.eye(q + 1, dtype=np.int64) + s
    c = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [ones, jac]])  # symmetric conference
    h2 = np.array([[1, 1], [1, -1]])
    return np.kron(c, h2) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def _goethals_seidel(rows: tuple[str, str, str, str]) -> np.ndarray:
    """Goethals-Seidel array of four circulants A, B, C, D (first rows given); R is the back-diagonal."""
    a, b, c, d = (
        np.stack([np.roll([1 if ch == "+" else -1 for ch in r], i) for i in range(len(r))]) for r in rows
    )
    r = np.eye(len(rows[0]), dtype=np.int64)[::-1]  # back-diagonal
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ])


@functools.lru_cache(maxsize=None)
def _base_recipe(k: int) -> tuple | None:
    """How to build the base order k, as a small hashable recipe, or None if unknown."""
    if k in (1, 2):
        return ("sylvester", k)
    if k % 4 == 0 and _prime_power(k - 1):  # Paley I: q = k - 1 = 3 mod 4
        return ("paley", k - 1)
    if k % 8 == 4 and _prime_power(k // 2 - 1):  # Paley II: q = k/2 - 1 = 1 mod 4
        return ("paley", k // 2 - 1)
    if k in _GOETHALS_SEIDEL_ROWS:
        return ("goethals-seidel", k)
    for k1 in range(12, math.isqrt(k) + 1, 4):  # product of two non-power-of-two bases
        if k % k1 == 0 and (k // k1) & (k // k1 - 1) and _base_recipe(k1) and _base_recipe(k // k1):
            return ("kron", k1, k // k1)
    return None


@functools.lru_cache(maxsize=None)
def _base_hadamard(k: int) -> np.ndarray:
    """Unnormalized (+-1, int64) base Hadamard matrix of order k; treat as read-only."""
    recipe = _base_recipe(k)
    if recipe is None:
        raise NoHadamardError(f"no base Hadamard matrix of order {k}; supported: {SUPPORTED_FORMS}")
    if recipe[0] == "sylvester":
        h = np.array([[1]]) if k == 1 else np.array([[1, 1], [1, -1]])
    elif recipe[0] == "paley":
        h = _paley(recipe[1])
    elif recipe[0] == "goethals-seidel":
        h = _goethals_seidel(_GOETHALS_SEIDEL_ROWS[k])
    else:
        h = np.kron(_base_hadamard(recipe[1]), _base_hadamard(recipe[2]))
    h = h.astype(np.int64)
    hf = h.astype(np.float64)  # BLAS; exact, every partial sum is a small integer
    if h.shape != (k, k) or not np.array_equal(hf @ hf.T, k * np.eye(k)):
        raise RuntimeError(f"internal error: {recipe} did not give a Hadamard matrix of order {k}")
    h.setflags(write=False)
    return h


def _sylvester(n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Unnormalized Sylvester matrix of order n = 2^m (symmetric)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_order(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"Hadamard order must be an int, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    return int(n)


def decompose_order(n: int) -> tuple[int, int]:
    """(K, 2**m) with n = K * 2**m and K the base order used; K = 1 for powers of two.

    Raises NoHadamardError if no supported construction exists for n.
    """
    return _decompose_order(_check_order(n))  # check first: the cache would accept 12.0 for 12


@functools.lru_cache(maxsize=None)
def _decompose_order(n: int) -> tuple[int, int]:
    m = (n & -n).bit_length() - 1  # largest power of two dividing n
    for j in range(m, -1, -1):
        if _base_recipe(n >> j) is not None:
            return n >> j, 1 << j
    raise NoHadamardError(f"no Hadamard matrix of order {n} is known here; supported: {SUPPORTED_FORMS}")


def supported_order(n: int) -> bool:
    """True when hadamard_matrix(n) can be built."""
    try:
        decompose_order(n)
    except NoHadamardError:
        return False
    return True


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Normalized deterministic Hadamard matrix of order n: kron(H_K, H_{2^m}) / sqrt(n).

    A fresh tensor on each call (the integer base matrices are cached).
    """
    k, p = decompose_order(n)
    base = torch.as_tensor(_base_hadamard(k).copy(), dtype=dtype, device=device)
    return torch.kron(base, _sylvester(p, dtype, device)) / math.sqrt(n)


@functools.lru_cache(maxsize=64)
def _factor_matrices(
    n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Normalized kron factors of H_n: base H_K (None if K = 1) and Sylvester blocks of <= _MAX_BLOCK."""
    k, p = decompose_order(n)
    log_p = p.bit_length() - 1
    stages = math.ceil(log_p / math.log2(_MAX_BLOCK))
    logs = [log_p // stages + (i < log_p % stages) for i in range(stages)]  # balanced block sizes
    blocks = tuple(hadamard_matrix(1 << lg, dtype, device) for lg in logs)
    return (hadamard_matrix(k, dtype, device) if k > 1 else None), blocks


def fast_hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x @ H`` (``x @ H.T`` if inverse) over the last dim, H = hadamard_matrix(x.shape[-1]).

    H = kron(F_0, ..., F_t) with F_0 = H_K and small Sylvester blocks F_i (at most 128 wide). Viewing
    each row as a [K, b_1, ..., b_t] tensor, ``x @ H`` multiplies axis i by F_i; axis i is handled as
    ``F_i^T @ y.view(rows, b_i, inner)`` (a broadcast batched GEMM), which needs no transposes or
    copies. Total work is O(n (K + sum b_i)), i.e. O(n log n) for the power-of-two part.
    Half types are computed in float32; works on any device and is differentiable.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"fast_hadamard_transform needs a floating tensor, got {x.dtype}")
    n = x.shape[-1]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    base, blocks = _factor_matrices(n, compute, x.device)
    factors = blocks if base is None else (base.T if inverse else base, *blocks)  # Sylvester is symmetric
    y = x.to(compute).reshape(-1, n)
    inner = n
    for f in factors:
        b = f.shape[0]
        inner //= b
        y = y.reshape(-1, b) @ f if inner == 1 else torch.matmul(f.T, y.reshape(-1, b, inner))
    return y.reshape(x.shape).to(x.dtype)


def random_hadamard_matrix(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """diag(s) @ hadamard_matrix(n) with s a random +-1 vector drawn from a CPU generator."""
    n = _check_order(n)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n, torch.float64)).to(dtype)


def random_orthogonal_matrix(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian matrix, columns sign-corrected by diag(R)."""
    n = _check_order(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).to(dtype)
