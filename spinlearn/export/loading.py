"""Load a compressed-tensors export back as a float model that computes what vLLM serves.

Weights are decompressed by compressed-tensors' own compressors (``scale * q``, NVFP4 ``q * s_b / g``), and every
online transform of ``transform_config`` (location ``input``) is installed as a forward pre-hook
``x -> x V / sqrt(n)`` with the stored matrix V, the dense path vLLM takes. Offline records (``weight_input``)
are already in the weights and are not applied again. Then the inputs of the quantized linears are fake-quantized
as the scheme declares (w8a8: int8 dynamic per token; nvfp4: with the stored static input global scales), so the
model computes what vLLM computes, activations included.

Plain ``AutoModelForCausalLM.from_pretrained`` on such a directory (transformers 5.x) decompresses the
weights but ignores ``transform_config``: with online Hadamards it computes a different function. Use
``load_export`` (``spinlearn eval --model OUT``) or vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

CT_METHOD = "compressed-tensors"


def export_config(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a compressed-tensors checkpoint directory, or None for any other model."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except ValueError:
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == CT_METHOD else None


def is_export(path: str | Path) -> bool:
    return export_config(path) is not None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from ..artifacts import ROTATIONS_FILE

    files = sorted(f for f in path.glob("*.safetensors") if f.name != ROTATIONS_FILE)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(path)!r}")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _decompress(model: nn.Module, tensors: dict[str, Tensor], qc: dict) -> list[str]:
    """Replace (in ``tensors``) each quantized module's compressed tensors by its decompressed ``weight``; returns
    the names of those modules."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import is_match

    from .compressed import _eager

    if not qc.get("config_groups"):
        return []  # float export: only transforms
    config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "transform_config"})
    done = []
    for name, module in model.named_modules():
        prefix = f"{name}."
        local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if "weight_scale" not in local:
            continue  # not quantized
        for scheme in config.config_groups.values():
            if is_match(name, module, scheme.targets, config.ignore or []):
                fmt = scheme.format or config.format
                with _eager():
                    dec = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)
                for k in local:
                    if k != "input_global_scale":  # read by apply_activation_quant
                        tensors.pop(prefix + k)
                tensors[prefix + "weight"] = dec["weight"]
                done.append(name)
                break
    return done


def _online_hook(matrix: Tensor):
    scaled = matrix.to(torch.float64) / math.sqrt(matrix.shape[0])

    def hook(module, args):
        x = args[0]
        return (torch.matmul(x.to(torch.float64), scaled.to(x.device)).to(x.dtype), *args[1:])

    return hook


def apply_online_transforms(model: nn.Module, tensors: dict[str, Tensor], qc: dict) -> list[str]:
    """Install the online ``input`` transforms of ``transform_config``; returns the module names."""
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.utils import is_match

    raw = qc.get("transform_config") or {}
    if not raw:
        return []
    tconfig = TransformConfig.model_validate(raw)
    done = []
    for group, scheme in tconfig.config_groups.items():
        for args in scheme.apply:
            if args.location == "output":
                raise ValueError(f"transform group {group!r}: online output transforms are not supported by spinlearn")
            if args.location != "input":
                continue  # weight_input / weight_output: already folded into the stored weights
            suffix = f".{group}_{args.location}.weight"
            # vLLM keeps one matrix per group and width: a checkpoint may store it once per width or per layer
            shared = {t.shape[0]: t for k, t in tensors.items() if k.endswith(suffix)}
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and is_match(name, module, args.targets, args.ignore):
                    matrix = tensors.get(name + suffix, shared.get(module.in_features))
                    if matrix is None:
                        raise ValueError(f"transform {group!r} targets {name!r} but the checkpoint has no "
                                         f"{module.in_features}x{module.in_features} matrix '*{suffix}'")
                    module.register_forward_pre_hook(_online_hook(matrix))
                    done.append(name)
            for k in [k for k in tensors if k.endswith(suffix)]:
                tensors.pop(k)
    return done


_FORMAT_SCHEME = {"int-quantized": "w8a8", "nvfp4-pack-quantized": "nvfp4"}  # formats with activation quantization


def apply_activation_quant(model: nn.Module, names: list[str], tensors: dict[str, Tensor], qc: dict) -> str | None:
    """Fake-quantize the inputs of the quantized linears as the export declares (after the online transforms):
    w8a8 int8 dynamic per token (symmetric), nvfp4 with each layer's static ``input_global_scale``. The spec is the
    scheme's own (``schemes.resolve_scheme``). Returns the scheme name, or None for weight-only exports."""
    from ..fp4 import nvfp4_qdq
    from ..quant import quantize_activation
    from .schemes import resolve_scheme

    name = _FORMAT_SCHEME.get(qc.get("format"))
    if name is None:
        return None
    spec = resolve_scheme(name).quant.a
    scales = {k.removesuffix(".input_global_scale"): v for k, v in tensors.items() if k.endswith(".input_global_scale")}

    def hook(g):
        def fn(module, args):
            x = args[0]
            xq = nvfp4_qdq(x, global_scale=g).to(x.dtype) if g is not None else quantize_activation(x, spec)
            return (xq, *args[1:])
        return fn

    for mod_name in names:
        model.get_submodule(mod_name).register_forward_pre_hook(hook(scales.get(mod_name)))
    for k in scales:
        tensors.pop(f"{k}.input_global_scale", None)
    return name


def load_export(path: str | Path, *, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False) -> nn.Module:
    """A compressed-tensors export as an eval-mode float model computing what vLLM serves: weights decompressed,
    online transforms hooked, then the declared activation quantization (w8a8, nvfp4) hooked.

    ``model.spinlearn_export`` records {"format", "online": [module names], "activations": scheme or None}.
    ``trust_remote_code``: an export of a model with custom code (config.json auto_map) builds it with its own
    classes, from the files beside the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..loading import parse_dtype

    path = Path(path)
    qc = export_config(path)
    if qc is None:
        raise ValueError(f"{str(path)!r} is not a compressed-tensors checkpoint "
                         "(no quantization_config in config.json)")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    want = parse_dtype(dtype)
    torch_dtype = want
    if want == "auto":
        saved = getattr(config, "dtype", None) or torch.float32
        torch_dtype = getattr(torch, saved) if isinstance(saved, str) else saved
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tensors = _read_tensors(path)
    quantized = _decompress(model, tensors, qc)
    online = apply_online_transforms(model, tensors, qc)
    activations = apply_activation_quant(model, quantized, tensors, qc)
    state = {k: v.to(torch_dtype) if torch.is_floating_point(v) else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"export {str(path)!r} does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.spinlearn_export = {"format": qc.get("format"), "online": online, "activations": activations}
    return model.eval()
