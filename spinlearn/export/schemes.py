"""Export schemes: what each deployable checkpoint holds, as spinlearn quantizers and as compressed-tensors args.

=======  ==========================================================  =========================  ==================
scheme   weights / activations                                        compressed-tensors format  vLLM kernel
=======  ==========================================================  =========================  ==================
w4a16    int4 symmetric, per group (default 128) or per channel (-1)  pack-quantized             WNA16 (Marlin, CPU)
w8a8     int8 symmetric per channel / int8 dynamic per token          int-quantized              W8A8 int8
nvfp4    FP4 E2M1, FP8 scale per 16, global scale / the same, dynamic nvfp4-pack-quantized       NVFP4 (FP4 GPUs)
float    the fused float model (online Hadamards folded + declared)   none                       unquantized
=======  ==========================================================  =========================  ==================

The spinlearn side is a ``QuantSettings`` built through ``QuantSettings.from_flags`` (the one mapping from
recipe keys to quantizer specs), so the exported integers are those spinlearn's evaluation measures. vLLM has
no integer W4A4 and no 4-bit KV-cache kernels: such requests are refused, naming what it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import EXPORT_SCHEMES, WEIGHT_METHODS
from ..quant import QuantSettings

DEFAULT_W4_GROUP = 128  # llm-compressor's W4A16 preset and vLLM's usual group
GROUPED_SCHEMES = ("w4a16",)  # the schemes a weight group size applies to (nvfp4's groups of 16 are fixed)
SERVED = "w4a16 (int4 weights), w8a8 (int8 weights and activations), nvfp4 (W4A4 in NVIDIA FP4) or float"
# Scheme names users may try that vLLM cannot run, and why.
_UNSERVABLE = {
    "w4a4": "vLLM has no integer W4A4 kernel",
    "w4a4kv4": "vLLM has no integer W4A4 kernel and no 4-bit KV cache",
    "w4a8": "int W4A8 needs a recipe spinlearn does not export",
    "kv4": "vLLM has no 4-bit KV cache (it offers fp8)",
    "w16a4kv4": "vLLM has no 4-bit integer activations or KV cache",
    "mxfp4": "spinlearn does not export MXFP4 yet",
}


@dataclass(frozen=True)
class ExportScheme:
    """One export scheme, resolved: ``quant`` are spinlearn's quantizers (None for float), ``format`` the
    compressed-tensors compression format, ``group_size`` the weight group (-1 = per channel)."""

    name: str
    format: str | None
    quant: QuantSettings | None
    group_size: int

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def ct_scheme(self, targets: list[str]):
        """compressed-tensors ``QuantizationScheme`` (pydantic) of this scheme for ``targets``."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from compressed_tensors.quantization.quant_args import FP8_E4M3_DATA

        if self.name == "w4a16":
            strategy = "group" if self.group_size > 0 else "channel"
            w = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy,
                                 group_size=self.group_size if self.group_size > 0 else None)
            return QuantizationScheme(targets=targets, weights=w, format=self.format)
        if self.name == "w8a8":
            w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
            a = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
            return QuantizationScheme(targets=targets, weights=w, input_activations=a, format=self.format)
        if self.name == "nvfp4":
            fp8 = FP8_E4M3_DATA.dtype
            w = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                 scale_dtype=fp8, zp_dtype=fp8)
            a = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                 dynamic="local", observer="static_minmax", scale_dtype=fp8, zp_dtype=fp8)
            return QuantizationScheme(targets=targets, weights=w, input_activations=a, format=self.format)
        raise ValueError(f"scheme {self.name!r} has no quantization arguments")


def check_scheme_name(name: str) -> str:
    """The normalised scheme name, or a ValueError saying what vLLM can serve."""
    key = str(name).strip().lower()
    if key in EXPORT_SCHEMES:
        return key
    why = _UNSERVABLE.get(key.replace("-", "").replace("_", ""))
    reason = f"{why}; " if why else ""
    raise ValueError(f"export scheme {name!r} cannot be served: {reason}vLLM serves {SERVED} "
                     f"(choose one of {', '.join(EXPORT_SCHEMES)})")


def check_w_method(method: str) -> str:
    if method not in WEIGHT_METHODS:
        raise ValueError(f"weight method {method!r} is unknown: use one of {', '.join(WEIGHT_METHODS)}")
    return method


def resolve_scheme(name: str, group_size: int | None = None, *, w_clip: bool = False) -> ExportScheme:
    """Scheme name (+ the int4 group size: None = 128, -1 = per channel) -> ExportScheme.

    ``w_clip``: the run's MSE clip search for weight scales (recipe ``quant.w_clip``), so RTN finds the scales
    the run evaluated with."""
    key = check_scheme_name(name)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size == 0 or group_size < -1):
        raise ValueError(f"group size {group_size!r} is invalid: use -1 (per channel) or a positive group size")
    if key != "w4a16" and group_size not in (None, -1) and not (key == "nvfp4" and group_size == 16):
        fixed = {"w8a8": "per channel (-1)", "nvfp4": "16", "float": "not quantized"}[key]
        raise ValueError(f"--group-size {group_size} does not apply to scheme {key!r} (its weights are {fixed}); "
                         "group sizes are for w4a16")
    if key == "w4a16":
        g = DEFAULT_W4_GROUP if group_size is None else group_size
        quant = QuantSettings.from_flags(w_bits=4, w_sym=True, w_groupsize=g, w_clip=w_clip)
        return ExportScheme(key, "pack-quantized", quant, g)
    if key == "w8a8":
        quant = QuantSettings.from_flags(w_bits=8, w_sym=True, w_groupsize=-1, w_clip=w_clip, a_bits=8, a_sym=True)
        return ExportScheme(key, "int-quantized", quant, -1)
    if key == "nvfp4":
        quant = QuantSettings.from_flags(w_bits=4, a_bits=4, format="nvfp4")
        return ExportScheme(key, "nvfp4-pack-quantized", quant, 16)
    return ExportScheme(key, None, None, -1)
