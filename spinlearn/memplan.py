"""Memory plan: the estimated peak memory per GPU of a rotation-training run, before anything is downloaded.

    spinlearn plan --model DIR_OR_CONFIG_JSON --config RECIPE [--gpus N --gpu-mem GiB] [--json OUT]

Only the model's ``config.json`` is read: the model is built on the ``meta`` device (no memory, no weights)
to count its parameters exactly and to resolve the recipe's rotation layout on it, so the plan knows which
tensors are rotated (one- or two-sided), how large every rotation is and how big each decoder layer is.

What one training step holds at its peak (forward, then backward of the quantized model's loss):

* frozen weights, in the recipe's ``model.dtype`` (tied embeddings are untied by a real copy);
* rotated-weight temporaries: each rotated/quantized tensor is recomputed as quant(R_out^T W R_in) every step
  and autograd keeps what the backward to the rotations needs (a float32 working copy of a half-precision
  weight, the float32 W R_in of a two-sided rotation, the final weight a linear saves). Without gradient
  checkpointing every decoder layer's stay alive until the backward; with it (``train.gradient_checkpointing``)
  only one layer's (recomputed in the backward) and the embeddings / lm_head's, which are outside the layers
  (for a 128k vocabulary these vocabulary-sized copies are the largest item); plus, for half-precision weights,
  the float32 result of the largest tensor's rotation before its cast back;
* activations at ``data.seqlen`` x ``train.per_device_train_batch_size`` tokens: what autograd saves per token
  and decoder layer (counted on a wrapped W4A4KV4 model: 8 hidden-size, 4 intermediate-size, 2 query-size and
  2 key/value-size vectors) times ACT_TRANSIENT_FACTOR for the transients of the backward, measured on CPU;
  with checkpointing only each layer's input plus one layer's activations;
* the logits and the losses' copies of them, in the logits' dtype, per token and vocab entry (``spinlearn.losses``
  keeps one gradient per loss and nothing else): LOGIT_COPIES, the logits themselves, the cross-entropy's gradient
  (``loss.ce_weight``) and, with the KL to the float teacher (``loss.kl_weight``), the teacher's logits and the
  KL's gradient;
* the rotations (float32), their gradients, the optimizer's momentum (Cayley SGD with momentum > 0,
  Riemannian Adam's two moments) and DDP's gradient bucket.

Per strategy, per GPU: single process and DDP hold everything on each GPU; FSDP shards the frozen weights
over N (plus the gathered units: two decoder layers and the embeddings/lm_head), replicates the rotations;
device-map (one process) spreads the decoder layers over N GPUs and each GPU holds its layers' weights,
temporaries and activations (the last one the lm_head and logits).

The estimate counts live tensors. tests/test_memplan.py checks it against the measured peak RSS of real CPU
training steps (glibc told to return freed blocks at once, so that RSS follows the live tensors): within 25%
for two model sizes (measured: 3% or better; bf16, seqlen 1024 and checkpointing within 7%, ``-m slow``).
A GPU adds its CUDA context and allocator slack (``overhead_gib``, GPU_OVERHEAD_GIB by default; not measured).
The plan's last row is the node's CPU memory for the weights (``host_weights``): FSDP needs one copy, on rank 0.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ACT_ELEMS_PER_TOKEN", "ACT_TRANSIENT_FACTOR", "CPU_OVERHEAD_GIB", "GPU_OVERHEAD_GIB", "LOGIT_COPIES",
           "STRATEGIES", "ModelShape", "Settings", "estimate", "format_plan", "host_weights", "load_config",
           "make_plan", "model_shape"]

GIB = 1024**3
# Tensors autograd saves per token and decoder layer, in units of hidden / intermediate / query / key-value width,
# counted with saved_tensors_hooks on a Llama wrapped for W4A4KV4 training (R1, R2, R3, R4 on).
ACT_ELEMS_PER_TOKEN = {"hidden": 8, "intermediate": 4, "query": 2, "kv": 2}
# Measured peak / saved activations on CPU (gradients of the activations and the backward's temporaries).
ACT_TRANSIENT_FACTOR = 1.6
# Copies of the logits (in their dtype) alive at the peak: the logits, and what each loss adds (spinlearn.losses:
# the cross-entropy its gradient; the KL the teacher's logits and its gradient). Measured on CPU (20.2M Llama, 1024
# tokens of a 32000 vocabulary): 1.8 copies for the cross-entropy alone in float32 and bfloat16, 3 for the KL alone.
LOGIT_COPIES = {"logits": 1, "ce": 1, "kl": 2}
# Float32 copies of the largest rotated tensor alive while it is rotated, beyond what autograd keeps: its rotated
# result before the cast back to a half-precision dtype (a float32 model's result is the saved weight itself).
WEIGHT_TRANSIENT_F32_COPIES = 1
# rotation.apply activations: inputs quantized in the rotated basis per token and decoder layer, in widths (q, k, v,
# gate and up read the hidden state, o_proj the attention output, down_proj the MLP's, and the V cache), and the
# float32 copies autograd keeps of each (the quantizer's rotated output, read back through R^T).
ROTATED_INPUTS_PER_TOKEN = {"hidden": 5, "query": 1, "intermediate": 1, "kv": 1}
ROTATED_INPUT_F32_COPIES = 1
# Units FSDP holds gathered at once (the current decoder layer and the prefetched next one).
FSDP_GATHERED_LAYERS = 2
# CUDA context, cuBLAS workspaces and caching-allocator slack per GPU (not measured: a margin).
GPU_OVERHEAD_GIB = 1.5
# The same for a CPU process (thread pools, kernel caches, the autograd engine): measured as the peak RSS of a
# training step of a 0.1M-parameter model, which the components account for only ~2 MiB of.
CPU_OVERHEAD_GIB = 0.035
AUTO_LAYOUT_STANDIN = "transformer_universal"
STRATEGIES = ("single", "ddp", "fsdp", "device_map")
STRATEGY_LABELS = {"single": "single process", "ddp": "DDP", "fsdp": "FSDP", "device_map": "device map"}


def load_config(path: str | Path, trust_remote_code: bool = False):
    """A transformers config from a model directory (only its config.json is read) or a config.json path.
    ``trust_remote_code``: a config with custom code (``auto_map``) is decoded by its own class, from the files
    beside it."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--model {str(path)!r}: no config.json there (give a model directory or the path "
                                "of its config.json; no weights are needed)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{file}: no 'model_type' key, so the architecture is unknown")
    if trust_remote_code and "auto_map" in values:  # the configuration_*.py beside it
        return AutoConfig.from_pretrained(str(file.parent), trust_remote_code=True)
    return AutoConfig.from_pretrained(str(file), trust_remote_code=False)  # transformers' own decoding, never the hub


@dataclass
class ModelShape:
    """What the plan needs to know about a model, counted on the meta device."""

    name: str
    layout: str
    params: int  # after untying tied embeddings
    layer_params: list[int]  # per decoder layer
    outer_params: int  # embeddings, lm_head, final norm (outside the decoder layers)
    head_params: int  # lm_head
    embed_params: int
    vocab: int
    widths: dict[str, int]  # hidden / intermediate / query / kv widths of one token in one layer
    layer_saved_elems: list[dict[str, int]]  # per layer: rotated elements by kind (see _saved_kinds)
    outer_saved_elems: dict[str, dict[str, int]]  # "embed" / "head": the same, outside the layers
    largest_rotated: int  # elements of the largest rotated/quantized tensor
    rotation_sizes: list[int] = field(default_factory=list)  # n of every n x n rotation instance

    @property
    def layers(self) -> int:
        return len(self.layer_params)


def _decoder_layers(model) -> tuple[str, list]:
    from torch import nn

    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, list(mod)), n
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    return best


def _widths(cfg, moe: bool) -> dict[str, int]:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * cfg.hidden_size
    per_tok = 1
    if moe:  # each token runs through its top-k experts
        inter = getattr(cfg, "moe_intermediate_size", None) or inter
        per_tok = getattr(cfg, "num_experts_per_tok", None) or 1
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return {"hidden": cfg.hidden_size, "intermediate": inter * per_tok, "query": heads * head_dim, "kv": kv * head_dim}


def _saved_kinds(targets_sides: dict, linear_like) -> dict[str, int]:
    """Elements of rotated tensors by what autograd keeps of them: "final" (the weight a linear saves),
    "rotated" (a float32 working copy when the weight is in half precision), "two_sided" (float32 W R_in)."""
    out = {"final": 0, "rotated": 0, "two_sided": 0}
    for t, sides in targets_sides.values():
        n = t.weight.numel()
        out["rotated"] += n
        out["final"] += n if linear_like(t) else 0
        out["two_sided"] += n if len(sides) > 1 else 0
    return out


def _rotated_targets(model, layout_name: str, config):
    """name -> (Target, sides) of every tensor the layout rotates, and the n of every rotation instance."""
    from .layout import load_layout, resolve_dims, resolve_placements

    layout = load_layout(layout_name)
    dims = resolve_dims(layout, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about patterns of other families
        placements = resolve_placements(model, layout, dims)
    targets: dict[str, tuple] = {}
    for p in placements:
        targets.setdefault(p.target.name, (p.target, set()))[1].add(p.side)
    sizes = {p.instance: dims[p.matrix] for p in placements}
    return targets, list(sizes.values())


def model_shape(config, layout: str = "transformer_universal", trust_remote_code: bool = False) -> ModelShape:
    """Count ``config``'s model on the meta device and resolve ``layout`` on it (no memory, no weights).
    ``layout: auto`` is inferred by running a model, which the meta device cannot: AUTO_LAYOUT_STANDIN is
    counted instead (the same tensors are rotated for the families it covers)."""
    from torch import nn

    from .loading import meta_model

    model = meta_model(config, trust_remote_code=trust_remote_code)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    params = sum(p.numel() for p in model.parameters()) + (embed.weight.numel() if tied else 0)
    prefix, layers = _decoder_layers(model)
    moe = any(".experts." in n for n, _ in model.named_parameters())
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    layout = AUTO_LAYOUT_STANDIN if str(layout) == "auto" else layout
    targets, sizes = _rotated_targets(model, layout, config)

    def linear_like(t) -> bool:
        return not isinstance(t.module, nn.Embedding)

    def group(pred) -> dict[str, int]:
        return _saved_kinds({n: v for n, v in targets.items() if pred(n)}, linear_like)

    head_name = next((n for n, m in model.named_modules() if m is head), None)
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    return ModelShape(
        name=type(model).__name__, layout=str(layout), params=params, layer_params=layer_params,
        outer_params=params - sum(layer_params), head_params=head.weight.numel() if head is not None else 0,
        embed_params=embed.weight.numel(), vocab=embed.weight.shape[0], widths=_widths(text_cfg, moe),
        layer_saved_elems=[group(lambda n, i=i: n.startswith(f"{prefix}.{i}.")) for i in range(len(layers))],
        outer_saved_elems={"embed": group(lambda n: n == embed_name), "head": group(lambda n: n == head_name)},
        largest_rotated=max((t.weight.numel() for t, _ in targets.values()), default=0), rotation_sizes=sizes,
    )


@dataclass
class Settings:
    """The recipe keys the plan depends on."""

    dtype: str = "bfloat16"
    seqlen: int = 2048
    batch: int = 1  # per device
    gradient_checkpointing: bool = False
    optimizer: str = "cayley_sgd"
    momentum: float = 0.0
    kl_weight: float = 0.0
    ce_weight: float = 1.0
    layout: str = "transformer_universal"
    on_activations: bool = False  # rotation.apply resolved: the matrices act on the activations (16-bit weights)

    @classmethod
    def from_recipe(cls, cfg) -> Settings:
        from .activation_side import resolve_apply

        q = cfg.quant
        return cls(dtype=cfg.model.dtype, seqlen=cfg.data.seqlen, batch=cfg.train.per_device_train_batch_size,
                   gradient_checkpointing=cfg.train.gradient_checkpointing, optimizer=cfg.rotation.optimizer,
                   momentum=cfg.rotation.momentum, kl_weight=cfg.loss.kl_weight, ce_weight=cfg.loss.ce_weight,
                   layout=cfg.rotation.layout,
                   on_activations=resolve_apply(cfg.rotation.apply, q.w_bits < 16 or q.lm_head_bits < 16))

    @property
    def bytes(self) -> int:
        import torch

        return getattr(torch, self.dtype).itemsize

    @property
    def tokens(self) -> int:
        return self.seqlen * self.batch


def _saved_bytes(kinds: dict[str, int], s: int) -> float:
    return kinds["final"] * s + kinds["two_sided"] * 4 + (kinds["rotated"] * 4 if s < 4 else 0)


def _optimizer_copies(st: Settings) -> int:
    if st.optimizer == "riemannian_adam":
        return 2
    return 1 if st.momentum > 0 else 0


def _logit_bytes(st: Settings) -> float:
    """Bytes per token and vocabulary entry of the logits and the losses' copies of them."""
    copies = LOGIT_COPIES["logits"] + LOGIT_COPIES["ce"] * (st.ce_weight > 0) + LOGIT_COPIES["kl"] * (st.kl_weight > 0)
    return copies * st.bytes


def _components(shape: ModelShape, st: Settings, *, layers: list[int], embed: bool, head: bool, weights: float,
                ckpt: bool, replicas_sync: bool, overhead: float) -> dict[str, float]:
    """Bytes per component on one GPU holding decoder ``layers`` (and the embeddings / lm_head + logits when
    ``embed`` / ``head``); ``weights``: the frozen weights' bytes there; ``replicas_sync``: DDP/FSDP gradient
    all-reduce of the rotations (one more float32 copy)."""
    s, tokens = st.bytes, st.tokens
    per_layer = [_saved_bytes(shape.layer_saved_elems[i], s) for i in layers]
    outer = (_saved_bytes(shape.outer_saved_elems["embed"], s) if embed else 0) + (
        _saved_bytes(shape.outer_saved_elems["head"], s) if head else 0)
    temporaries = (max(per_layer, default=0) if ckpt else sum(per_layer)) + outer
    temporaries += WEIGHT_TRANSIENT_F32_COPIES * 4 * shape.largest_rotated if s < 4 else 0
    act_token = s * sum(ACT_ELEMS_PER_TOKEN[k] * shape.widths[k] for k in ACT_ELEMS_PER_TOKEN) * ACT_TRANSIENT_FACTOR
    if st.on_activations:  # no rotated weight exists; each quantized input keeps its rotated copies instead
        temporaries = 0.0
        copies = ROTATED_INPUT_F32_COPIES + (1 if s < 4 else 0)  # + the float32 upcast of a half-precision input
        act_token += 4 * copies * sum(n * shape.widths[k] for k, n in ROTATED_INPUTS_PER_TOKEN.items())
    if ckpt:  # each layer's input is kept; one layer's activations are rebuilt in the backward
        activations = tokens * (len(layers) * shape.widths["hidden"] * s + (act_token if layers else 0))
    else:
        activations = tokens * len(layers) * act_token
    logits = tokens * shape.vocab * _logit_bytes(st) if head else 0.0
    rot = sum(n * n for n in shape.rotation_sizes) * 4
    copies = 2 + _optimizer_copies(st) + (1 if replicas_sync else 0)  # matrices, gradients, momentum, bucket
    rotations = rot * copies + 4 * 4 * max(shape.rotation_sizes, default=0) ** 2  # Cayley step temporaries
    return {"frozen weights": weights, "rotated-weight temporaries": temporaries, "activations": activations,
            "logits and loss": logits, "rotations, gradients, optimizer state": rotations,
            "runtime (CUDA context, workspaces, allocator)": overhead}


def _chunks(n_layers: int, gpus: int) -> list[list[int]]:
    per = math.ceil(n_layers / gpus)
    return [list(range(i, min(i + per, n_layers))) for i in range(0, n_layers, per)]


def estimate(shape: ModelShape, st: Settings, strategy: str, gpus: int = 1, *, ckpt: bool | None = None,
             overhead_gib: float = GPU_OVERHEAD_GIB) -> dict[str, float]:
    """Peak bytes per GPU by component (and "total") for ``strategy`` over ``gpus`` GPUs; ``ckpt``: gradient
    checkpointing (default: the recipe's). device_map: the busiest GPU."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: need at least one GPU")
    ckpt = st.gradient_checkpointing if ckpt is None else ckpt
    s, everything = st.bytes, list(range(shape.layers))
    common = dict(ckpt=ckpt, overhead=overhead_gib * GIB)
    if strategy in ("single", "ddp"):
        comps = _components(shape, st, layers=everything, embed=True, head=True, weights=shape.params * s,
                            replicas_sync=strategy == "ddp" and gpus > 1, **common)
    elif strategy == "fsdp":
        gathered = FSDP_GATHERED_LAYERS * max(shape.layer_params) + shape.outer_params
        weights = min(shape.params, shape.params / gpus + gathered) * s
        comps = _components(shape, st, layers=everything, embed=True, head=True, weights=weights,
                            replicas_sync=gpus > 1, **common)
    else:
        chunks = _chunks(shape.layers, gpus)
        per_gpu = []
        for g, chunk in enumerate(chunks):
            first, last = g == 0, g == len(chunks) - 1
            weights = (sum(shape.layer_params[i] for i in chunk) + (shape.embed_params if first else 0)
                       + (shape.outer_params - shape.embed_params if last else 0)) * s
            per_gpu.append(_components(shape, st, layers=chunk, embed=first, head=last, weights=weights,
                                       replicas_sync=False, **common))
        comps = max(per_gpu, key=lambda c: sum(c.values()))
    comps["total"] = sum(comps.values())
    return comps


def make_plan(model: str | Path, recipe, *, gpus: int = 1, gpu_mem: float | None = None, overrides=(),
              overhead_gib: float = GPU_OVERHEAD_GIB) -> dict:
    """The whole plan as a JSON-able dict: ``model`` a directory with a config.json or the json's path,
    ``recipe`` a recipe path (with ``overrides``) or a loaded recipe. Sizes in GiB. With one GPU only the
    single-process plan is made (DDP, FSDP and a device map over one GPU are the same)."""
    from omegaconf import DictConfig

    from .config import load_recipe

    cfg = recipe if isinstance(recipe, DictConfig) else load_recipe(recipe, overrides)
    st = Settings.from_recipe(cfg)
    remote = bool(cfg.model.trust_remote_code)
    shape = model_shape(load_config(model, trust_remote_code=remote), st.layout, trust_remote_code=remote)
    estimates, fits = {}, {}
    for strategy in STRATEGIES if gpus > 1 else ("single",):
        estimates[strategy] = {}
        for key, on in (("checkpointing_off", False), ("checkpointing_on", True)):
            comps = estimate(shape, st, strategy, gpus, ckpt=on, overhead_gib=overhead_gib)
            estimates[strategy][key] = {k: v / GIB for k, v in comps.items()}
        if gpu_mem is not None:
            fits[strategy] = {key: e["total"] <= gpu_mem for key, e in estimates[strategy].items()}
    return {"model": str(model), "architecture": shape.name, "layout": shape.layout, "params": shape.params,
            "layers": shape.layers, "rotations": len(shape.rotation_sizes), "settings": asdict(st), "gpus": gpus,
            "gpu_mem_gib": gpu_mem, "overhead_gib": overhead_gib, "estimates": estimates, "fits": fits,
            "host_gib": {k: v / GIB for k, v in host_weights(shape, st, gpus).items() if k in estimates}}


def host_weights(shape: ModelShape, st: Settings, gpus: int) -> dict[str, float]:
    """Bytes of the model's weights in the node's CPU memory, per strategy: every process loads the whole model
    before it moves to its GPU (single, DDP: ``gpus`` copies at once), FSDP's rank 0 alone holds it, for the whole
    run (``spinlearn.sharded``: it fills the other ranks' shards, then fuses and exports)."""
    whole = shape.params * st.bytes
    return {"single": whole, "ddp": gpus * whole, "fsdp": whole, "device_map": whole}


def _gib(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def format_plan(plan: dict) -> str:
    """The plan as a Markdown table (GiB per GPU; the recipe's checkpointing setting marked)."""
    st, n = plan["settings"], plan["gpus"]
    recipe_key = "checkpointing_on" if st["gradient_checkpointing"] else "checkpointing_off"
    est = plan["estimates"]
    strategies = [s for s in STRATEGIES if s in est]
    cols = [f"{STRATEGY_LABELS[s]}" + ("" if s == "single" else f" ({n})") for s in strategies]
    mem = f", {n} GPU(s) x {plan['gpu_mem_gib']:g} GiB" if plan["gpu_mem_gib"] is not None else f", {n} GPU(s)"
    lines = [
        f"{plan['model']}: {plan['architecture']}, {plan['params'] / 1e9:.2f}B parameters, {plan['layers']} layers, "
        f"{plan['rotations']} rotations (layout {plan['layout']}); {st['dtype']}, seqlen {st['seqlen']} x batch "
        f"{st['batch']} per device{mem}; the matrices act on the "
        f"{'activations (16-bit weights: no rotated weight is formed)' if st['on_activations'] else 'weights'}. "
        f"Estimated peak memory per GPU (GiB); the recipe has gradient checkpointing "
        f"{'on' if st['gradient_checkpointing'] else 'off'}.", "",
        "| component | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
    ]
    components = [k for k in est["single"]["checkpointing_off"] if k != "total"]
    varying = ("rotated-weight temporaries", "activations")
    for comp in components:
        keys = (("checkpointing_off", ", checkpointing off"), ("checkpointing_on", ", checkpointing on")) \
            if comp in varying else (("checkpointing_off", ""),)
        for key, suffix in keys:
            lines.append(f"| {comp}{suffix} | " + " | ".join(_gib(est[s][key][comp]) for s in strategies) + " |")
    for key, label in (("checkpointing_off", "checkpointing off"), ("checkpointing_on", "checkpointing on")):
        mark = " (recipe)" if key == recipe_key else ""
        cells = []
        for s in strategies:
            cell = f"**{_gib(est[s][key]['total'])}**"
            if plan["fits"]:
                cell += " fits" if plan["fits"][s][key] else " does not fit"
            cells.append(cell)
        lines.append(f"| **peak, {label}{mark}** | " + " | ".join(cells) + " |")
    lines.append(f"| host (CPU) memory for the weights, whole node | "
                 + " | ".join(_gib(plan["host_gib"][s]) for s in strategies) + " |")
    return "\n".join(lines) + "\n"
