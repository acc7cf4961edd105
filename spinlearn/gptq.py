"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column, pushing each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian of the
layer-wise reconstruction loss ||X W^T - X Q^T||^2, whose Hessian is H = 2 X^T X / N.

The grid (scales, zero points, rounding) is the one from `spinlearn.quant`, so a GPTQ weight
lies on exactly the grid that `quantize_weight` would use.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from spinlearn.online import ROUTER_GLOBS
from spinlearn.quant import QuantSpec, find_qparams, input_quantizer, qrange, quant_dequant, weight_qparams

__all__ = ["HessianAccumulator", "RefitAccumulator", "refit_weight", "gptq_quantize_weight", "gptq_quantize_model"]


class HessianAccumulator:
    """Running H = 2/N * sum_n x_n x_n^T over all rows (tokens) of the inputs seen so far, in float32.

    N counts rows of the flattened input [..., in] (the reference counts sequences instead; the
    difference is a constant factor, which GPTQ is invariant to since dampening is relative).
    Use `add_batch` directly or register `forward_hook` on the linear layer.
    """

    def __init__(self, in_features: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.nsamples = 0
        self._hessian: Tensor | None = None

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("HessianAccumulator.add_batch expects inputs [..., in_features], got a scalar")
        if self.in_features is None:
            self.in_features = x.shape[-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator: input has {x.shape[-1]} features, expected {self.in_features} "
                "(the layer's in_features)"
            )
        rows = x.detach().reshape(-1, self.in_features).to(self.dtype)
        n = rows.shape[0]
        if n == 0:
            return
        if self._hessian is None:
            self._hessian = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=rows.device)
        # Running average keeps the magnitude stable however many batches are added.
        self._hessian.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        rows = rows.to(self._hessian.device) * math.sqrt(2.0 / self.nsamples)
        self._hessian.addmm_(rows.T, rows)

    def forward_hook(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        """`module.register_forward_hook(acc.forward_hook)` collects the module's input."""
        self.add_batch(args[0])

    @property
    def hessian(self) -> Tensor:
        if self._hessian is None:
            raise RuntimeError(
                "GPTQ needs calibration data: no inputs were added to the HessianAccumulator "
                "(call add_batch(x) with the layer's inputs, or run calibration batches through the model "
                "with forward_hook registered)"
            )
        return self._hessian


class RefitAccumulator:
    """For GPTQ's asymmetric calibration: the running Hessian of the inputs the quantized layer reads, ``xq`` (its
    input quantizer's output), and the running cross term C = 2/N * sum_n x_n xq_n^T with the inputs ``x`` it should
    act on (the same inputs before the quantizer). Register ``hook`` on the layer's input quantizer."""

    def __init__(self, in_features: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.quantized = HessianAccumulator(in_features, dtype)
        self._cross: Tensor | None = None

    @torch.no_grad()
    def add_pair(self, x: Tensor, xq: Tensor) -> None:
        if x.shape != xq.shape:
            raise ValueError(f"RefitAccumulator: target inputs {tuple(x.shape)} and quantized inputs "
                             f"{tuple(xq.shape)} differ in shape")
        seen = self.quantized.nsamples
        self.quantized.add_batch(xq)
        acc = self.quantized
        rows_q = xq.detach().reshape(-1, acc.in_features).to(acc.dtype)
        if rows_q.shape[0] == 0:
            return
        rows_x = x.detach().reshape(-1, acc.in_features).to(acc.dtype)
        if self._cross is None:
            self._cross = torch.zeros_like(acc.hessian)
        self._cross.mul_(seen / acc.nsamples)
        self._cross.addmm_(rows_x.T.to(self._cross.device), rows_q.to(self._cross.device), alpha=2.0 / acc.nsamples)

    def hook(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        """``quantizer.register_forward_hook(acc.hook)``: the quantizer's input is x, its output xq."""
        self.add_pair(args[0], output)

    @property
    def hessian(self) -> Tensor:
        return self.quantized.hessian

    @property
    def cross(self) -> Tensor:
        _ = self.quantized.hessian  # raises the same error when nothing was added
        return self._cross


@torch.no_grad()
def refit_weight(weight: Tensor, hessian: Tensor, cross: Tensor, percdamp: float = 0.01) -> Tensor:
    """The weight GPTQ's refit quantizes: W C (H + damp I)^-1, the ridge least-squares fit of W' Xq to W X, with H the
    Hessian of the inputs Xq the quantized model gives the layer, C = X Xq^T their cross term with the inputs X it
    should act on, and GPTQ's own dampening (damp = percdamp * mean diag H) as the ridge. GPTQ on it with H then
    minimises ||W X - Q Xq||^2 (plus the ridge; undamped, the cross term vanishes): the rounding also corrects the
    activation quantizer's error (GPTAQ's asymmetric calibration). For float inputs (C = H) it is W H (H + damp I)^-1:
    W shrunk along the input directions the calibration data barely excites, which narrows the range the weight's
    grid has to cover."""
    h = hessian.to(torch.float64)
    energy = torch.diag(h).mean().item()
    if energy <= 0:  # no input energy: nothing to fit
        return weight
    h.diagonal().add_(percdamp * energy)
    w = weight.to(torch.float64)
    fitted = torch.cholesky_solve(cross.to(torch.float64).T @ w.T, torch.linalg.cholesky(h)).T
    return fitted.to(weight.dtype)


def _inverse_hessian_cholesky(h: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (so H^-1 = U^T U) and the dampening used."""
    damp = percdamp * torch.diag(h).mean().item()
    h = h.clone()
    h.diagonal().add_(damp)
    hint = f"increase percdamp (now {percdamp}) or use more calibration data"
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise RuntimeError(f"GPTQ: the dampened Hessian is not positive definite (Cholesky failed): {hint}")
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(u).all():
        raise RuntimeError(f"GPTQ: Cholesky of the inverse Hessian failed: {hint}")
    return u, damp


@torch.no_grad()
def gptq_quantize_weight(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    clip: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """GPTQ-quantize `weight` [out, in] given the input Hessian [in, in]; returns (dequantized weight, stats).

    Scales are per output channel (spec.group_size == -1, taken from the whole weight up front) or
    per group of columns, computed when the loop reaches the group's first column from the current,
    error-updated weights (with static_groups: from the original weights, up front). Unlike the
    reference, which reads a group's columns before this block's in-block updates, the columns are
    taken exactly as a column-by-column GPTQ would see them, so the result does not depend on
    block_size. act_order processes columns by descending Hessian diagonal; without static_groups the
    groups are then consecutive in that order. stats: "error" is GPTQ's own estimate of the added
    loss, sum (w - q)^2 / (2 [H^-1]_ii); "damp"; "dead_columns"; "scale" and "zero": the grid of the result,
    [out, in / group] per contiguous group of original columns ([out, 1] per channel), so that the result is
    ``scale * (q - zero)`` with integer q (an export stores q and these); None when act_order without
    static_groups makes the groups non-contiguous.

    ``clip`` [out, in / group] (one column per channel): fixed clip ratios per row and group (learned weight
    clipping's): the grid is round-to-nearest's with them (``_fixed_grid``), and GPTQ only chooses the integers.
    """
    _check_gptq_inputs(weight, hessian, spec, block_size, percdamp, static_groups)
    if not spec.enabled:
        return weight, {"error": 0.0, "damp": 0.0, "dead_columns": 0, "scale": None, "zero": None}
    n_in, group = weight.shape[1], spec.group_size
    qmin, qmax = qrange(spec.bits, spec.sym)
    w, h, dead = _without_dead_columns(weight, hessian, compute_dtype)
    if clip is not None:  # the learned grid, fixed up front
        scale, zero, static_params = _fixed_grid(weight, spec, clip, w.dtype)
        static_groups = group > 0
    else:
        scale, zero = _params(w, spec) if group <= 0 else (None, None)
        static_params = [_params(w[:, g : g + group], spec) for g in range(0, n_in, group)] if static_groups else []
    group_params: list[tuple[Tensor, Tensor]] = []
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]

    hinv, damp = _inverse_hessian_cholesky(h, percdamp)
    q_all = torch.zeros_like(w)
    losses = torch.zeros_like(w)

    for b1 in range(0, n_in, block_size):
        b2 = min(b1 + block_size, n_in)
        w1 = w[:, b1:b2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if group > 0:
                if static_groups:
                    orig = perm[col].item() if perm is not None else col
                    scale, zero = static_params[orig // group]
                elif col % group == 0:
                    scale, zero = _params(_current_columns(w, w1, err1, hinv, b1, b2, i, col + group), spec)
                    group_params.append((scale, zero))
            wc = w1[:, i]
            q = quant_dequant(wc.unsqueeze(1), scale, zero, qmin, qmax).squeeze(1)
            d = hinv1[i, i]
            q_all[:, col] = q
            losses[:, col] = (wc - q) ** 2 / d**2 / 2
            err = (wc - q) / d
            # OBS update of the rest of the block now; later blocks get one batched update below.
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, b2:] -= err1 @ hinv[b1:b2, b2:]

    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    stats = {"error": losses.sum().item(), "damp": damp, "dead_columns": int(dead.sum().item()),
             **_grid_params(scale, zero, static_params or ([] if perm is not None else group_params), group)}
    return q_all.to(weight.dtype), stats


def _check_gptq_inputs(weight: Tensor, hessian: Tensor, spec: QuantSpec, block_size: int, percdamp: float,
                       static_groups: bool) -> None:
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize_weight expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n_in = weight.shape[1]
    if hessian.shape != (n_in, n_in):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}, expected ({n_in}, {n_in}) for a weight of {tuple(weight.shape)}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive (128 is the usual choice)")
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0 (0.01 is the usual choice)")
    if not spec.enabled:
        return
    group = spec.group_size
    if group > 0 and n_in % group != 0:
        raise ValueError(f"QuantSpec group_size={group} does not divide in_features {n_in}: use a divisor of {n_in}")
    if static_groups and group <= 0:
        raise ValueError("static_groups=True needs a QuantSpec with group_size > 0")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian contains NaN or inf (check the calibration inputs)")


def _params(cols: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The spec's grid for these columns (its clip ratio, its MSE search)."""
    return find_qparams(cols, spec.bits, spec.sym, float(spec.clip_ratio), spec.mse_clip)


def _fixed_grid(weight: Tensor, spec: QuantSpec, clip: Tensor, dtype: torch.dtype):
    """(scale, zero, static group params) of round-to-nearest's grid with per-row (group) clip ratios ``clip``:
    ``quant.weight_qparams`` of the original weight, taken up front as with static groups (no MSE search)."""
    if spec.format != "int":
        raise ValueError(f"GPTQ with fixed clip ratios needs int weights (format {spec.format!r})")
    grid = QuantSpec(bits=spec.bits, sym=spec.sym, group_size=spec.group_size, format=spec.format)
    scale, zero = (t.to(dtype) for t in weight_qparams(weight.detach(), grid, clip))  # checks clip's shape
    if spec.group_size <= 0:
        return scale, zero, []
    return None, None, [(scale[:, k : k + 1], zero[:, k : k + 1]) for k in range(scale.shape[1])]


def _without_dead_columns(weight: Tensor, hessian: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Working copies of W and H. A column whose input is always zero has no influence: it is zeroed and H gets
    a unit diagonal there. Returns (w, h, dead column mask)."""
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=w.device, dtype=dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h, dead


def _grid_params(scale, zero, groups: list[tuple[Tensor, Tensor]], group: int) -> dict:
    """stats["scale"], stats["zero"] as [out, n_groups] (see gptq_quantize_weight)."""
    if group <= 0:
        return {"scale": scale.reshape(-1, 1), "zero": zero.reshape(-1, 1)}
    if not groups:
        return {"scale": None, "zero": None}
    return {"scale": torch.cat([s.reshape(-1, 1) for s, _ in groups], 1),
            "zero": torch.cat([z.reshape(-1, 1) for _, z in groups], 1)}


def _current_columns(
    w: Tensor, w1: Tensor, err1: Tensor, hinv: Tensor, b1: int, b2: int, i: int, end: int
) -> Tensor:
    """Columns [b1 + i, end) as the sequential algorithm would see them right now.

    Inside the block they live in w1; beyond it, w still lacks this block's pending (lazy) update
    from the i columns already quantized, which we apply here to the slice only.
    """
    cols = w1[:, i : min(end, b2) - b1]
    if end <= b2:
        return cols
    rest = w[:, b2:end] - err1[:, :i] @ hinv[b1 : b1 + i, b2:end]
    return torch.cat([cols, rest], dim=1)


# ------------------------------------------------------------------------------------------------ whole model
GPTQ_SKIP = ("lm_head", *ROUTER_GLOBS)  # linears GPTQ leaves alone by default (MoE routers stay float)

class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs of interest are captured."""


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The first (outermost) ModuleList whose blocks hold Linears: the decoder layers of an HF model."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            return name, mod
    return None


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in skip)


def _check_unwrapped(name: str, mod: nn.Linear) -> None:
    if parametrize.is_parametrized(mod, "weight"):
        raise ValueError(
            f"gptq_quantize_model: {name!r} has a weight parametrization (rotation/quantizer wrappers); "
            "run GPTQ on the plain (rotated) float model first, then install the quantization wrappers"
        )


def _first_output(out):
    return out[0] if isinstance(out, tuple | list) else out


def _call_groups(layer: nn.Module, linears: dict[str, nn.Linear], run) -> list[list[str]]:
    """Linears of a layer in call order, those reading the very same input tensor grouped together
    (q/k/v, gate/up): GPTQ quantizes a group, then recomputes the inputs of the next one."""
    calls: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def make_hook(name):
        def hook(module, args, output):
            if name not in seen:
                seen.add(name)
                calls.append((name, args[0]))  # keeping the tensor alive makes `is` identity meaningful

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    prev = None
    for name, x in calls:
        if groups and x is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    return groups


def _quantize_group(
    names: list[str], linears: dict[str, nn.Linear], run, spec: QuantSpec, stats: dict[str, float], gptq_kw: dict,
    qparams: dict | None = None, clips: dict[str, Tensor] | None = None,
) -> None:
    kw = dict(gptq_kw)
    refit = kw.pop("refit", False)
    quantizers = {n: input_quantizer(linears[n]) if refit else None for n in names}
    accs = {n: RefitAccumulator(linears[n].in_features) if quantizers[n] is not None
            else HessianAccumulator(linears[n].in_features) for n in names}
    handles = [quantizers[n].register_forward_hook(accs[n].hook) if quantizers[n] is not None
               else linears[n].register_forward_hook(accs[n].forward_hook) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for n in names:
        w = linears[n].weight
        target = w.detach()
        if refit:  # the ridge fit from the inputs the quantized model gives (float ones: C = H) to the float outputs
            cross = accs[n].cross if quantizers[n] is not None else accs[n].hessian
            target = refit_weight(target, accs[n].hessian, cross, kw["percdamp"])
        q, st = gptq_quantize_weight(target, accs[n].hessian, spec, clip=(clips or {}).get(n), **kw)
        w.data.copy_(q)
        stats[n] = st["error"]
        if qparams is not None:
            qparams[n] = (st["scale"], st["zero"])


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib_blocks: Tensor | None,
    spec: QuantSpec,
    *,
    skip: Sequence[str] = GPTQ_SKIP,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    refit: bool = False,
    progress: bool = True,
    qparams: dict | None = None,
    clips: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """GPTQ-quantize every nn.Linear of ``model`` in place (weights become dequantized grid values).

    Sequential, as in the GPTQ/QuaRot reference ("true sequential"): decoder layers in order, each layer's
    inputs computed by the already-quantized layers before it; inside a layer the Linears are taken in call
    order, those sharing one input (q/k/v, gate/up) together, and every group's inputs are recomputed after
    the previous group was quantized. Forward pre-hooks already on the model (the online R4 Hadamard of
    ``fakequant.wrap_model(..., online=...)``) run before the Hessian hook sees the input, so they are part of
    the problem.
    Linears outside the decoder layers (and all of them if no layer list is found) get their Hessians from
    one pass of the whole model at the end. Activations are quantized during calibration when the caller installed
    input quantizers (``fakequant.wrap_model`` with 16-bit weights, e.g. ``QuantSettings.for_calibration``): every
    layer then sees the inputs the quantized model gives it.

    ``refit``: every weight is refitted before GPTQ rounds it (``refit_weight``: the ridge least-squares fit, GPTQ's
    dampening as the ridge, from the inputs Xq the layer gets to the outputs W X it should give, X its input before
    its quantizer); a linear whose input is quantized gets its Hessian from the quantized inputs, so that GPTQ
    minimises ||W X - Q Xq||^2 and corrects the activation quantizer's error too (GPTAQ's asymmetric calibration).

    Weights that are not nn.Linear (3-D MoE expert tensors) are left alone: quantize them another way.
    ``calib_blocks`` is a LongTensor [n, seqlen] of token ids, run one window at a time.
    Returns {linear name: GPTQ's estimate of the added loss}. A dict passed as ``qparams`` receives
    {linear name: (scale, zero)} of each result's grid (see ``gptq_quantize_weight``'s "scale").
    ``clips`` {linear name: clip ratios [out, in / group]} (learned weight clipping's) fixes those linears' grids
    to round-to-nearest's with these ratios (``gptq_quantize_weight``'s ``clip``; with ``refit``, of the refitted
    weight); every name must be a linear this call quantizes.
    """
    _check_calib_blocks(calib_blocks)
    linears = gptq_linears(model, skip)
    if not linears:
        raise ValueError(f"gptq_quantize_model: no nn.Linear left to quantize (skip={tuple(skip)})")
    for n, m in linears.items():
        _check_unwrapped(n, m)
    unknown = sorted(set(clips or {}) - set(linears))
    if unknown:
        raise ValueError(f"gptq_quantize_model: clip ratios for {unknown[0]!r}, which is not a linear GPTQ quantizes "
                         f"here ({len(unknown)} such names; skip={tuple(skip)}); name the nn.Linear modules")
    gptq_kw = dict(percdamp=percdamp, block_size=block_size, act_order=act_order, static_groups=static_groups,
                   refit=refit)
    device = next(model.parameters()).device
    blocks = calib_blocks.to(device)
    stats: dict[str, float] = {}
    was_training = model.training
    model.eval()
    found = _decoder_layers(model)
    done: set[str] = set()
    if found is not None:
        done = _quantize_layers(model, found, linears, blocks, spec, gptq_kw, stats, qparams, progress, clips or {})
    rest = {n: m for n, m in linears.items() if n not in done}
    if rest:

        def run_model():
            for b in blocks:
                model(input_ids=b.unsqueeze(0), use_cache=False)

        _quantize_group(list(rest), rest, run_model, spec, stats, gptq_kw, qparams, clips)
    model.train(was_training)
    return stats


def gptq_linears(model: nn.Module, skip: Sequence[str] = GPTQ_SKIP) -> dict[str, nn.Linear]:
    """The nn.Linear modules ``gptq_quantize_model(model, ..., skip=skip)`` quantizes, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)}


def _check_calib_blocks(calib_blocks: Tensor | None) -> None:
    if calib_blocks is None or calib_blocks.numel() == 0:
        raise ValueError(
            "GPTQ needs calibration data: pass calib_blocks as a LongTensor [nsamples, seqlen] of token ids "
            "(CLI: --calib-data FILE)"
        )
    if calib_blocks.dim() != 2 or calib_blocks.dtype != torch.long:
        raise ValueError(
            "calib_blocks must be a LongTensor [nsamples, seqlen], "
            f"got {calib_blocks.dtype} {tuple(calib_blocks.shape)}"
        )


def _quantize_layers(model, found, linears, blocks, spec, gptq_kw, stats, qparams, progress, clips) -> set[str]:
    """The decoder layers in order, each on the inputs the already-quantized layers before it produce; inside a
    layer the linears sharing one input together. Returns the names of the linears done."""
    prefix, layers = found
    done: set[str] = set()
    bar = tqdm(total=len(layers), desc="gptq", disable=not progress)
    inputs, calls = _layer_inputs(model, layers, blocks)
    for i, layer in enumerate(layers):
        lin = {n: linears[f"{prefix}.{i}.{n}"] for n, _ in layer.named_modules() if f"{prefix}.{i}.{n}" in linears}
        call = calls[i]

        def run(call=call):
            for x in inputs:
                call(x)

        for group in _call_groups(layer, lin, lambda call=call: call(inputs[0])):
            local: dict[str, float] = {}
            local_q: dict | None = {} if qparams is not None else None
            local_clips = {n: clips[f"{prefix}.{i}.{n}"] for n in group if f"{prefix}.{i}.{n}" in clips}
            _quantize_group(group, lin, run, spec, local, gptq_kw, local_q, local_clips)
            stats.update({f"{prefix}.{i}.{n}": e for n, e in local.items()})
            if qparams is not None:
                qparams.update({f"{prefix}.{i}.{n}": v for n, v in local_q.items()})
        done.update(f"{prefix}.{i}.{n}" for n in lin)
        inputs = [_first_output(call(x)) for x in inputs]  # what the next layer sees, quantized
        bar.update(1)
    bar.close()
    return done


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, blocks: Tensor) -> tuple[list[Tensor], list]:
    """Hidden states entering layer 0 for every calibration window, and for each layer a function that calls
    it on new hidden states with the other arguments (masks, position embeddings) it got in one recorded
    full pass. Layers of hybrid models get different masks, hence one per layer; none depends on the
    window's content (all windows have the same length)."""
    calls: list = [None] * len(layers)

    def record(i):
        def hook(module, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k not in ("use_cache", "past_key_values", "hidden_states")}
            rest = args[1:]
            if "hidden_states" in kwargs:
                calls[i] = lambda x, m=module, a=rest, k=kw: m(*a, hidden_states=x, **k)
            else:
                calls[i] = lambda x, m=module, a=rest, k=kw: m(x, *a, **k)

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=blocks[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise ValueError("gptq_quantize_model: some decoder layers were not called in a forward pass")

    inputs: list[Tensor] = []

    def capture(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for b in blocks:
            try:
                model(input_ids=b.unsqueeze(0), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, calls
