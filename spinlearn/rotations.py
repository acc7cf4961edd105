"""Rotation matrices: how they are made (hadamard / base_hadamard / orthogonal) and how they act on a tensor.

Convention: row vectors, ``x -> x @ R``. A reader (Linear ``y = x W^T``) of a rotated stream needs
``W <- W R`` (input axis); a writer whose output ``y`` becomes ``y R`` needs its output axis multiplied the
same way (``W <- R^T W``, ``b <- b R``; an Embedding's rows ``E <- E R``). Both are "multiply that axis by R
on the right", which is all ``rotate_axis`` does. A matrix smaller than the axis acts block-diagonally
(R2 on every attention head).
"""

from __future__ import annotations

import warnings

import torch

from .hadamard import NoHadamardError, hadamard_matrix, random_hadamard_matrix, random_orthogonal_matrix


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


class RotationBank(torch.nn.Module):
    """The learnable matrices, each a geoopt ManifoldParameter on the Stiefel manifold, registered once.

    Instance names ("r1", "r2.model.layers.0") contain dots, which parameter names cannot: they are stored
    under sanitised keys and looked up through ``get``."""

    def __init__(self, matrices: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        import geoopt

        super().__init__()
        self.names = list(matrices)
        self.params = torch.nn.ParameterDict(
            {
                self._key(n): geoopt.ManifoldParameter(m.detach().to(dtype).clone(), manifold=geoopt.Stiefel())
                for n, m in matrices.items()
            }
        )

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def get(self, name: str) -> torch.Tensor:
        return self.params[self._key(name)]

    def matrices(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n).detach().clone() for n in self.names}

    @torch.no_grad()
    def load_matrices(self, matrices: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(matrices)
        if missing:
            raise KeyError(f"rotations missing from the file: {sorted(missing)}")
        for n in self.names:
            self.get(n).copy_(matrices[n].to(self.get(n).dtype))

    def max_orthogonality_error(self) -> float:
        return max((orthogonality_error(self.get(n).detach()) for n in self.names), default=0.0)
