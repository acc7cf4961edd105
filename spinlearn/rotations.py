"""Rotation matrices: how they are made (hadamard / base_hadamard / orthogonal) and how they act on a tensor.

Convention: row vectors, ``x -> x @ R``. A reader (Linear ``y = x W^T``) of a rotated stream needs
``W <- W R`` (input axis); a writer whose output ``y`` becomes ``y R`` needs its output axis multiplied the
same way (``W <- R^T W``, ``b <- b R``; an Embedding's rows ``E <- E R``). Both are "multiply that axis by R
on the right", which is all ``rotate_axis`` does. A matrix smaller than the axis acts block-diagonally
(R2 on every attention head).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from .hadamard import NoHadamardError, hadamard_matrix, random_hadamard_matrix, random_orthogonal_matrix

BANK_ATTR = "spinlearn_rotations"  # where the learnable RotationBank hangs on a model during training


def make_rotation(n: int, mode: str, generator: torch.Generator, *, name: str = "") -> torch.Tensor:
    """A float64 n x n orthogonal matrix. Falls back to a random orthogonal one (with a warning) when no
    Hadamard matrix of order n is known."""
    try:
        if mode == "base_hadamard":
            return hadamard_matrix(n, dtype=torch.float64)
        if mode == "hadamard":
            return random_hadamard_matrix(n, generator, dtype=torch.float64)
    except NoHadamardError:
        warnings.warn(
            f"no Hadamard matrix of order {n} is known (matrix {name or '?'}, dimension {n}); "
            "using a random orthogonal matrix instead",
            stacklevel=2,
        )
        return random_orthogonal_matrix(n, generator, dtype=torch.float64)
    if mode == "orthogonal":
        return random_orthogonal_matrix(n, generator, dtype=torch.float64)
    raise ValueError(f"unknown rotation mode {mode!r}; use hadamard, base_hadamard or orthogonal")


def fix_ones_direction(r: torch.Tensor) -> torch.Tensor:
    """Return an orthogonal M close in spirit to r with M @ 1 = 1 (a Householder reflection composed with r).

    LayerNorm subtracts the channel mean; a residual stream that is zero-mean stays zero-mean under x -> x M
    only if M maps the all-ones vector to itself, which keeps LayerNorm models exactly invariant."""
    n = r.shape[0]
    u = torch.full((n,), n**-0.5, dtype=r.dtype, device=r.device)
    w = r @ u - u
    norm2 = w @ w
    if norm2 < 1e-24:
        return r
    return r - 2.0 * torch.outer(w, w @ r) / norm2


def _blocks_on_last_axis(t: torch.Tensor, d: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` with ``axis`` moved last, and a view of it in blocks of d (block-diagonal application)."""
    x = t.movedim(axis, -1)
    n = x.shape[-1]
    if n % d:
        raise ValueError(f"a {d}x{d} rotation does not divide axis {axis} of size {n} (shape {tuple(t.shape)})")
    return x, x.reshape(*x.shape[:-1], n // d, d)


def rotate_axis(t: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply ``axis`` of ``t`` by ``r`` on the right, block-diagonally when r is smaller. Differentiable."""
    x, blocks = _blocks_on_last_axis(t, r.shape[0], axis)
    return (blocks @ r).reshape(x.shape).movedim(-1, axis)


def signed_hadamard_signs(r: torch.Tensor) -> torch.Tensor | None:
    """If ``r == diag(s) @ H`` (H = hadamard_matrix(n)), return s; else None. Lets folding use the
    O(n log n) transform instead of a dense product for the hadamard / base_hadamard modes."""
    from .hadamard import hadamard_matrix, supported_order

    n = r.shape[0]
    if r.ndim != 2 or not supported_order(n):
        return None
    h = hadamard_matrix(n, dtype=r.dtype, device=r.device)
    s = torch.sign(r[:, 0]) * torch.sign(h[:, 0])
    if not torch.allclose(s[:, None] * h, r, rtol=0, atol=1e-12 if r.dtype == torch.float64 else 1e-6):
        return None
    return s


def rotate_axis_fast(t: torch.Tensor, r: torch.Tensor, axis: int, signs: torch.Tensor | None) -> torch.Tensor:
    """rotate_axis, using ``x @ diag(s) H = fht(x * s)`` when the signs of a signed Hadamard are given."""
    if signs is None:
        return rotate_axis(t, r, axis)
    from .hadamard import fast_hadamard_transform

    x, blocks = _blocks_on_last_axis(t, r.shape[0], axis)
    return fast_hadamard_transform(blocks * signs.to(blocks.dtype)).reshape(x.shape).movedim(-1, axis)


def orthogonality_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return (r.transpose(-1, -2) @ r - eye).abs().max().item()


def _ones_householder(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """v with H = I - 2 v v^T / (v^T v) the reflection swapping e1 and u = 1 / sqrt(n) (H is symmetric)."""
    if n < 2:
        raise ValueError(f"a mean-preserving rotation needs n >= 2, got n = {n}")
    v = torch.full((n,), -(n**-0.5), dtype=dtype, device=device)
    v[0] += 1.0
    return v


def ones_preserving(q: torch.Tensor) -> torch.Tensor:
    """The n x n matrix R = H diag(1, Q) H for an (n-1) x (n-1) Q, H the reflection swapping e1 and 1/sqrt(n).

    R 1 = 1 for any Q, and R is orthogonal iff Q is: the mean-preserving rotations (LayerNorm models) are
    exactly these. Differentiable w.r.t. Q, and O(n^2) (two rank-one updates, no dense n x n product)."""
    n = q.shape[-1] + 1
    v = _ones_householder(n, q.dtype, q.device)
    c = 2.0 / (v @ v)
    d = torch.nn.functional.pad(q, (1, 0, 1, 0))
    d = d + torch.nn.functional.pad(torch.ones(1, 1, dtype=q.dtype, device=q.device), (0, n - 1, 0, n - 1))
    a = d - c * torch.outer(d @ v, v)  # D H
    return a - c * torch.outer(v, v @ a)  # H D H


def ones_residual(r: torch.Tensor) -> float:
    """max |R 1 - 1|: how far r is from mapping the all-ones vector to itself."""
    return (r.sum(-1) - 1.0).abs().max().item()


def ones_complement(r: torch.Tensor, *, name: str = "", tol: float = 1e-4) -> torch.Tensor:
    """The Q with ``ones_preserving(Q) == r`` (float64), for an orthogonal r with r 1 = 1.

    Raises ValueError naming the matrix when r does not map the all-ones vector to itself within ``tol``."""
    r64 = r.detach().to(torch.float64)
    err = ones_residual(r64)
    if not err <= tol:
        raise ValueError(
            f"rotation {name or '?'} must map the all-ones vector to itself (LayerNorm model: the residual "
            f"rotation has to keep the channel mean), but max |R 1 - 1| = {err:.2e} > {tol:.0e}; build it with "
            "spinlearn.rotations.fix_ones_direction or ones_preserving"
        )
    v = _ones_householder(r64.shape[0], torch.float64, r64.device)
    c = 2.0 / (v @ v)
    a = r64 - c * torch.outer(r64 @ v, v)  # R H
    return (a - c * torch.outer(v, v @ a))[1:, 1:]  # H R H = diag(1, Q)


class RotationBank(torch.nn.Module):
    """The learnable matrices, each a geoopt ManifoldParameter on the Stiefel manifold, registered once.

    Instance names ("r1", "r2.model.layers.0") contain dots, which parameter names cannot: they are stored
    under sanitised keys and looked up through ``get``.

    Instances named in ``preserve_ones`` (the residual matrix of a LayerNorm model, see ``for_plan``) stay
    mean-preserving through training: their parameter is the (n-1) x (n-1) Q of ``R = ones_preserving(Q)``, so
    the optimizer moves Q on its own Stiefel manifold and every R it produces maps 1 to 1. ``get``,
    ``matrices`` and ``load_matrices`` always speak full n x n matrices; ``parameter_tensors`` /
    ``load_parameter_tensors`` are the optimizer's variables themselves (bit-exact checkpoints)."""

    def __init__(self, matrices: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 preserve_ones: Iterable[str] = ()):
        import geoopt

        super().__init__()
        self.names = list(matrices)
        wanted = set(preserve_ones)  # once: an iterator would be used up by the first name
        self.preserve_ones = tuple(n for n in self.names if n in wanted)
        unknown = sorted(wanted - set(self.names))
        if unknown:
            raise KeyError(f"preserve_ones names matrices the bank does not hold: {unknown} "
                           f"(it holds {self.names[:4]})")
        self.params = torch.nn.ParameterDict({
            self._key(n): geoopt.ManifoldParameter(
                self._variable(n, m).to(dtype).clone(memory_format=torch.contiguous_format), manifold=geoopt.Stiefel())
            for n, m in matrices.items()
        })

    @classmethod
    def for_plan(cls, plan, matrices: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> RotationBank:
        """The bank for a ``RotationPlan``: in a LayerNorm model (``plan.mean_preserving``) every instance of the
        residual matrix is kept mean-preserving (``preserve_ones``)."""
        keep = [inst for inst, (mname, _) in plan.instances().items()
                if plan.mean_preserving and mname == plan.residual_matrix]
        return cls(matrices, dtype, preserve_ones=keep)

    def _variable(self, name: str, m: torch.Tensor) -> torch.Tensor:
        """What the parameter holds for the full matrix m: m itself, or its Q (checked)."""
        if name in self.preserve_ones:
            return ones_complement(m, name=repr(name))
        return m.detach()

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def get(self, name: str) -> torch.Tensor:
        p = self.params[self._key(name)]
        return ones_preserving(p) if name in self.preserve_ones else p

    @torch.no_grad()
    def matrices(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n).detach().clone() for n in self.names}

    def _check_names(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        missing = set(self.names) - set(tensors)
        if missing:
            raise KeyError(f"{what} missing from the file: {sorted(missing)}")

    @torch.no_grad()
    def load_matrices(self, matrices: dict[str, torch.Tensor]) -> None:
        """Set every matrix from full n x n matrices (a mean-preserving one must map 1 to 1, checked)."""
        self._check_names(matrices, "rotations")
        for n in self.names:
            p = self.params[self._key(n)]
            p.copy_(self._variable(n, matrices[n]).to(p.dtype))

    def parameter_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's variables by instance name (Q for a mean-preserving matrix, else R itself)."""
        return {n: self.params[self._key(n)].detach().clone() for n in self.names}

    @torch.no_grad()
    def load_parameter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Exact inverse of ``parameter_tensors`` (bit-exact resume)."""
        self._check_names(tensors, "rotation parameters")
        for n in self.names:
            p = self.params[self._key(n)]
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise ValueError(
                    f"rotation parameter {n!r} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[n].to(p.dtype))

    def max_orthogonality_error(self) -> float:
        return max((orthogonality_error(self.get(n).detach()) for n in self.names), default=0.0)
