"""Writing a compressed-tensors checkpoint through the compressed-tensors library.

Each quantized linear's local state ``{weight, weight_scale[, weight_global_scale, input_global_scale]}`` goes
through the library's own compressor for the scheme's format (``BaseCompressor`` registry:
``pack-quantized`` packs int4 into int32 ``weight_packed`` [out, in/8] + ``weight_shape``; ``int-quantized``
stores int8 ``weight``; ``nvfp4-pack-quantized`` packs E2M1 pairs into uint8 ``weight_packed`` [out, in/2] and
casts ``weight_scale`` to FP8 E4M3). ``config.json`` gets ``quantization_config`` from the library's pydantic
``QuantizationConfig`` / ``TransformConfig`` through ``ModelCompressor.update_config``.

The compressors recover the codes as ``round(weight / scale)``; ``weight`` is spinlearn's dequantized grid value
(``scale * q``), so the codes are spinlearn's integers exactly. Integer scales are stored in the model's dtype (as
llm-compressor does): exact for float32 models; a bfloat16 model's scales are rounded to bfloat16 (relative 2^-9).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..artifacts import apply_umask_modes, copy_tokenizer_files, save_safetensors
from .schemes import ExportScheme
from .weights import QuantizedLinear

SHARD_BYTES = 4 * 1024**3  # safetensors shard size (an index file is written when there are several)
SAFE_INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def _eager():
    """compressed-tensors' FP4 rounding is ``torch.compile``d (~20 s of compiling on a CPU); run it eagerly."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def compressor_for(scheme: ExportScheme):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(scheme.format)


def compress_linear(values: QuantizedLinear, scheme: ExportScheme, ct_scheme, dtype: torch.dtype) -> dict[str, Tensor]:
    """One linear's compressed local state dict (``weight_packed``, ``weight_scale``, ...)."""
    if scheme.name == "nvfp4":
        local = {"weight": values.weight.to(torch.float32), "weight_scale": values.scale,
                 "weight_global_scale": values.global_scale, "input_global_scale": values.input_global_scale}
    else:
        local = {"weight": values.weight.to(torch.float32), "weight_scale": values.scale.to(torch.float32)}
    with _eager():
        out = compressor_for(scheme).compress(local, ct_scheme)
    if scheme.name != "nvfp4":
        out["weight_scale"] = out["weight_scale"].to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def checkpoint_tensors(model: nn.Module, quantized: dict[str, QuantizedLinear], scheme: ExportScheme,
                       extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole checkpoint: the model's own tensors (tied duplicates once), quantized linears compressed,
    plus ``extra`` (transform matrices)."""
    dtype = next(model.parameters()).dtype
    replaced = {f"{n}.weight" for n in quantized}
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if name in replaced:
            continue
        if t.data_ptr() in seen and t.numel():
            continue  # tied weights (lm_head = embed_tokens): stored once, as save_pretrained does
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous()
    if quantized:
        ct_scheme = scheme.ct_scheme(["Linear"])
        for n, v in quantized.items():
            for k, t in compress_linear(v, scheme, ct_scheme, dtype).items():
                out[f"{n}.{k}"] = t.cpu()
    out.update({k: v.contiguous() for k, v in extra.items()})
    return out


def save_sharded(tensors: dict[str, Tensor], out: Path) -> list[str]:
    """``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index past SHARD_BYTES); file names."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_safetensors(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def quantization_config(scheme: ExportScheme, ignore: list[str]):
    """compressed-tensors ``QuantizationConfig`` (pydantic): one group targeting ``Linear``, ``ignore`` the rest."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": scheme.ct_scheme(["Linear"])}, format=scheme.format,
                              ignore=ignore, quantization_status="compressed")


def write_checkpoint(out: Path, model: nn.Module, tensors: dict[str, Tensor], qconfig, tconfig,
                     tokenizer_source: str | Path | None) -> None:
    """config.json (+ quantization_config), generation config, weights, tokenizer files into ``out``."""
    from compressed_tensors.compressors import ModelCompressor

    model.config.save_pretrained(str(out))
    if getattr(model, "_auto_class", None) is not None:  # custom code (trust_remote_code): its modeling files too,
        from transformers.dynamic_module_utils import custom_object_save  # as save_pretrained writes them

        custom_object_save(model, str(out), config=model.config)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(out))
    save_sharded(tensors, out)
    if qconfig is not None or tconfig is not None:
        ModelCompressor(quantization_config=qconfig, transform_config=tconfig).update_config(str(out))
    copy_tokenizer_files(tokenizer_source, out)
    apply_umask_modes(out)
