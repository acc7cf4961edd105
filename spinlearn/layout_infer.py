"""Find a model's residual stream by watching one forward pass, to infer a layout (``rotation.layout: auto``)
or to complete a given one (a ModelOpt universal layout on a family it does not name fully).

Hooks record every module's input and output on a short probe; then, over the hidden width H:

* residual norms: norm modules with a 1-D weight of width H and one tensor input. Their readers are the
  tensors whose module input equals the norm's output exactly (Linear, MoE router, MoE experts, lm_head);
* residual writers: every other tensor whose output side has width H (embeddings, o_proj, down_proj, Mamba's
  out_proj, MoE experts' down_proj);
* heads: an attention module whose ``v_proj`` reads a norm and which has one writer child gets a per-head R2;
  a fused qkv projection gets R1 only (its value heads are a slice of one output).

A norm over H that no tensor reads scales a sublayer's output before it joins the residual stream (Gemma2 and
Gemma3's post-norms): no rotation passes through it, and inference refuses. Exactness is then checked by
``rotation_plan.rotate``'s probe.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .layout import Layout, LayoutError, LayoutNote, Target, addressable_targets, load_layout, note, resolve_dim

PROBE_TOKENS = 8
Record = tuple[list[torch.Tensor], torch.Tensor | None]  # a module's tensor inputs and its output
_FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv", "c_attn")


@dataclass
class ResidualGraph:
    hidden: int
    norms: dict[str, list[str]] = field(default_factory=dict)  # residual norm -> reader tensor names
    writers: list[str] = field(default_factory=list)
    heads: list[tuple[str, str, int]] = field(default_factory=list)  # (v_proj, output projection, head_dim)
    fused_qkv: list[str] = field(default_factory=list)
    gated_norms: list[str] = field(default_factory=list)  # norms over H that take a gate (Mamba2): not residual
    unread_norms: list[str] = field(default_factory=list)  # norms over H whose output nothing reads

    @property
    def readers(self) -> list[str]:
        return list(dict.fromkeys(r for rs in self.norms.values() for r in rs))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


# ------------------------------------------------------------------------------------------------ tracing


@torch.no_grad()
def record_io(model: nn.Module, tokens: int = PROBE_TOKENS) -> dict[str, Record]:
    """module name -> (floating-point tensor inputs, first tensor output) of its first call on a probe."""
    records: dict[str, Record] = {}

    def hook(name):
        def fn(_mod, args, kwargs, output):
            ins = [a.detach().clone() for a in (*args, *kwargs.values())
                   if isinstance(a, torch.Tensor) and a.is_floating_point()]
            out = output[0] if isinstance(output, tuple | list) else output
            records.setdefault(name, (ins, out.detach().clone() if isinstance(out, torch.Tensor) else None))

        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def _input_of(t: Target, records) -> torch.Tensor | None:
    owner = t.name if t.module is not None else t.name.rsplit(".", 1)[0]  # bare parameter: its module's input
    ins = records.get(owner, ([], None))[0]
    return ins[0] if ins else None


def _same(x: torch.Tensor, y: torch.Tensor, width: int) -> bool:
    if x.shape[-1] != width or y.shape[-1] != width or x.numel() != y.numel():
        return False
    return torch.equal(x.reshape(-1, width).to(y.dtype), y.reshape(-1, width))


def trace_residual_graph(model: nn.Module) -> ResidualGraph:
    """The residual stream's norms, readers, writers and attention heads, from one probe forward."""
    width = hidden_size(model)
    records = record_io(model)
    targets = addressable_targets(model)
    graph = ResidualGraph(width)
    inputs = {n: x for n, t in targets.items() if (x := _input_of(t, records)) is not None}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "norm" not in type(mod).__name__.lower() or not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,):
            continue
        ins, out = records.get(name, ([], None))
        if out is None:
            continue
        if len(ins) > 1:
            graph.gated_norms.append(name)
            continue
        readers = [n for n, x in inputs.items() if _reads_hidden(targets[n], width) and _same(x, out, width)]
        if readers:
            graph.norms[name] = readers
        else:
            graph.unread_norms.append(name)
    read = set(graph.readers)
    graph.writers = [
        n for n, t in targets.items()
        if n not in read and (n in inputs or isinstance(t.module, nn.Embedding)) and t.weight.shape[t.out_axis] == width
    ]
    graph.heads, graph.fused_qkv = _heads(model, read, set(graph.writers))
    return graph


def _reads_hidden(t: Target, width: int) -> bool:
    return t.in_axis is not None and t.weight.shape[t.in_axis] == width


def _heads(model: nn.Module, readers: set[str], writers: set[str]):
    """(v_proj, output projection, head_dim) per attention module, and the attention modules with a fused qkv."""
    heads, fused = [], []
    for name, mod in model.named_modules():
        children = {c: f"{name}.{c}" if name else c for c, _ in mod.named_children()}
        outs = [full for full in children.values() if full in writers]
        if children.get("v_proj") in readers and len(outs) == 1:
            hd = getattr(mod, "head_dim", None) or _config_head_dim(model)
            if hd:
                heads.append((children["v_proj"], outs[0], int(hd)))
        elif any(children.get(c) in readers for c in _FUSED_QKV):
            fused.append(name)
    return heads, fused


def _config_head_dim(model: nn.Module) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutNote)
        try:
            return resolve_dim("head_dim", model.config)
        except LayoutError:
            return None


# ---------------------------------------------------------------------------------------------- inference


def refuse_inexact(graph: ResidualGraph, model: nn.Module) -> None:
    arch = type(model).__name__
    if graph.unread_norms:
        name = graph.unread_norms[0]
        raise LayoutError(
            f"cannot infer a layout for {arch}: norm {name!r} ({type(model.get_submodule(name)).__name__}, width "
            f"{graph.hidden}) is read by no linear module, so it scales a sublayer's output before it joins the "
            "residual stream (a Gemma2/Gemma3-style post-sublayer norm); no rotation passes through it exactly"
        )
    if not graph.writers or not graph.norms:
        raise LayoutError(
            f"cannot infer a layout for {arch}: found {len(graph.writers)} residual-stream writers and "
            f"{len(graph.norms)} norms over the hidden width {graph.hidden} with linear readers; write a layout"
        )


def generalize(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _dim_expr(config, value: int, candidates: tuple[str, ...]):
    """The first expression that gives ``value`` from the config as it is (no fallback note), else the int."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for expr in candidates:
        if expr.isidentifier() and getattr(text, expr, None) is None:
            continue  # a bare key the config lacks would resolve only through a fallback
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayoutNote)
            try:
                if resolve_dim(expr, config) == value and not caught:
                    return expr
            except LayoutError:
                continue
    return value


def _shorten(glob: str, names) -> str:
    """The shortest ``*suffix`` (whole name components) of a glob that matches the same tensors."""
    same = {n for n in names if fnmatch.fnmatchcase(n, glob)}
    parts = glob.split(".")
    for i in range(len(parts) - 1, 0, -1):
        short = "*" + ".".join(parts[i:])
        if {n for n in names if fnmatch.fnmatchcase(n, short)} == same:
            return short
    return glob


def placements_of(graph: ResidualGraph, use_r2: bool) -> dict[str, tuple[str | None, str | None]]:
    """tensor name -> [input matrix, output matrix] for an inferred layout (r1 on the stream, r2 per head)."""
    pairs: dict[str, tuple[str | None, str | None]] = {n: ("r1", None) for n in graph.readers}
    pairs.update({n: (None, "r1") for n in graph.writers})
    if use_r2:
        for v, o, _ in graph.heads:
            pairs[v], pairs[o] = ("r1", "r2"), ("r2", "r1")
    return pairs


def patterns_for(pairs: dict[str, tuple], all_names) -> dict[str, list]:
    """Group tensor names into ``glob|glob`` patterns per [input, output] pair; a layer index becomes ``*``
    where every tensor the glob matches has the same pair (fnmatch's ``*`` also crosses dots)."""
    grouped: dict[tuple, list[str]] = {}
    for n, pair in pairs.items():
        glob = generalize(n)
        same = all(pairs.get(m) == pair for m in all_names if fnmatch.fnmatchcase(m, glob))
        key = _shorten(glob, all_names) if same else n
        if key not in grouped.setdefault(pair, []):
            grouped[pair].append(key)
    return {"|".join(globs): list(pair) for pair, globs in grouped.items()}


def norm_config(graph: ResidualGraph, module_names) -> tuple[dict, list[str]]:
    """norm_fuse_config for the graph's norms (layer norms with readers relative to their parent), and the
    ignore_norms globs for other modules the layer globs also match (Mamba2's inner ``mixer.norm``)."""
    layer: dict[str, list[str]] = {}
    head: list[list[str]] = []
    for norm, readers in graph.norms.items():
        glob, parent = generalize(norm), norm.rsplit(".", 1)[0] + "."
        if glob == norm or not all(r.startswith(parent) for r in readers):
            head.append([norm, "|".join(readers)])  # by full names (the final norm, or readers elsewhere)
            continue
        rel = layer.setdefault(glob, [])
        rel += [r[len(parent):] for r in readers if r.startswith(parent) and r[len(parent):] not in rel]
    extra = {n for g in layer for n in module_names if fnmatch.fnmatchcase(n, g) and n not in graph.norms}
    ignore = sorted({generalize(n) for n in extra} | {generalize(n) for n in graph.gated_norms})
    if any(fnmatch.fnmatchcase(n, g) for n in graph.norms for g in ignore):
        ignore = sorted(extra | set(graph.gated_norms))  # a glob would hide a residual norm: exact names
    return {"decoder_layer_fuse": [[g, rs] for g, rs in layer.items()], "lm_head_fuse": head}, ignore


def infer_layout(model: nn.Module) -> Layout:
    """A layout for ``model`` from one probe forward (see the module docstring); refuses inexact families."""
    graph = trace_residual_graph(model)
    refuse_inexact(graph, model)
    head_dims = {hd for _, _, hd in graph.heads}
    use_r2 = len(head_dims) == 1
    if graph.fused_qkv:
        note(f"{type(model).__name__}: fused qkv projection in {graph.fused_qkv[0]!r}: R1 only for those heads")
    matrices = {"r1": {"dim": _dim_expr(model.config, graph.hidden, ("hidden_size",)), "mode": "hadamard",
                       "per_layer": False}}
    if use_r2:
        hd = head_dims.pop()
        dim = _dim_expr(model.config, hd, ("head_dim", "hidden_size // num_attention_heads"))
        matrices["r2"] = {"dim": dim, "mode": "hadamard", "per_layer": True}
    targets = addressable_targets(model)
    norms, ignore = norm_config(graph, [n for n, _ in model.named_modules()])
    return load_layout({
        "name": "auto",
        "rotation_matrices": matrices,
        "rotation_config": patterns_for(placements_of(graph, use_r2), targets),
        "norm_fuse_config": norms,
        "use_float64": True,
        "ignore_norms": ignore,
    })


# --------------------------------------------------------------------------------------------- completion


def complete_layout(model: nn.Module, layout: Layout) -> Layout:
    """``layout`` plus what float exactness needs and it misses, each addition with a note: residual readers
    and writers it does not rotate with its residual matrix (the one lm_head reads), and norm fusions that miss
    a reader (a norm must be fused into every module that reads it). Unchanged when nothing is missing, or
    when the layout gives lm_head no matrix (the verification probe then judges it)."""
    from .fusion import norm_readers
    from .layout import resolve_dims, resolve_placements

    placements = resolve_placements(model, layout, resolve_dims(layout, model.config))
    lm_head = _lm_head_name(model)
    residual = next((p.matrix for p in placements if p.side == "input" and p.target.name == lm_head), None)
    if residual is None:
        return layout
    try:
        graph = trace_residual_graph(model)
    except Exception as e:  # an exotic forward: keep the layout as written
        note(f"layout {layout.name!r}: could not trace {type(model).__name__} ({e}); layout used as written")
        return layout
    if graph.unread_norms:  # post-sublayer norms: no layout is exact; check_unfused_norms refuses
        return layout
    rot_cfg = _missing_placements(layout, graph, placements, residual, addressable_targets(model))
    given = {n: sorted(t.name for t in ts) for n, ts in norm_readers(model, layout).items()}
    found = {n: sorted(rs) for n, rs in graph.norms.items()}
    norms = {}
    if {n: rs for n, rs in given.items() if n not in graph.gated_norms} != found:
        changed = sorted(n for n in set(given) | set(found) if given.get(n) != found.get(n))
        note(f"layout {layout.name!r}: norm fusion follows the readers found in {type(model).__name__} "
             f"for {changed[:3]}{'...' if len(changed) > 3 else ''} (a norm must be fused into all its readers)")
        cfg, ignore = norm_config(graph, [n for n, _ in model.named_modules()])
        norms = {"decoder_layer_fuse": [(n, rs) for n, rs in cfg["decoder_layer_fuse"]],
                 "lm_head_fuse": [tuple(p) for p in cfg["lm_head_fuse"]],
                 "ignore_norms": list(dict.fromkeys(layout.ignore_norms + ignore))}
    if rot_cfg == layout.rotation_config and not norms:
        return layout
    return replace(layout, rotation_config=rot_cfg, **norms)


def _lm_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _missing_placements(layout: Layout, graph: ResidualGraph, placements, residual: str, targets) -> dict:
    """The layout's rotation_config plus the residual readers/writers it misses (as exact-name patterns)."""
    sides = {(p.target.name, p.side) for p in placements}
    add = {n: (residual, None) for n in graph.readers if (n, "input") not in sides}
    add.update({n: (None, residual) for n in graph.writers if (n, "output") not in sides})
    if not add:
        return layout.rotation_config
    what = ", ".join(f"{n} ({'reader' if pair[0] else 'writer'})" for n, pair in list(add.items())[:4])
    note(f"layout {layout.name!r} does not rotate {len(add)} residual-stream tensor(s) of the model: added "
         f"{what}{'...' if len(add) > 4 else ''} with {residual!r}")
    return {**layout.rotation_config, **patterns_for(add, targets)}
