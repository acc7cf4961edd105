"""Rotation layouts: the ModelOpt-schema YAML that says which matrix goes where.

A layout has four keys::

    rotation_matrices:          # name -> {dim, mode, per_layer}
      r1: {dim: hidden_size, mode: hadamard, per_layer: false}
      r2: {dim: head_dim, mode: hadamard, per_layer: true}
    rotation_config:            # "glob|glob" -> [input-side matrix, output-side matrix]
      "*embed_tokens": [null, r1]
      "*q_proj|*k_proj": [r1, null]
    norm_fuse_config:
      decoder_layer_fuse:       # [norm glob, [targets relative to the norm's parent]]
        - ["*input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
      lm_head_fuse:             # [norm name/glob, target name/glob]
        - ["model.norm", "lm_head"]
    use_float64: true           # do the rotation math in float64

``dim`` is an int, a config key (``hidden_size``, ``text_config.hidden_size``) or a small arithmetic
expression of keys (``hidden_size // num_attention_heads``; ``a or b`` takes the first the config has). ``per_layer`` is false (one matrix), true (one
per decoder layer, keyed by the module-name prefix up to the layer index) or a glob: modules are grouped by
the longest dotted prefix of their name that matches it.

Globs are matched against full dotted names (fnmatch). A glob addresses a module with a ``weight`` (Linear,
Embedding) or a parameter directly (transformers-5 MoE experts are 3-D parameters ``[E, out, in]``).
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .choices import ROTATION_MODES as MODES
from torch import nn

LAYOUT_DIR = Path(__file__).parent / "layouts"


class LayoutError(ValueError):
    """A layout that does not fit the model (or is malformed)."""


def shipped_layouts() -> list[str]:
    return sorted(p.stem for p in LAYOUT_DIR.glob("*.yaml"))


@dataclass
class MatrixSpec:
    name: str
    dim: Any  # int after resolve_dims
    mode: str = "hadamard"
    per_layer: bool | str = False


@dataclass
class Layout:
    name: str
    rotation_matrices: dict[str, MatrixSpec]
    rotation_config: dict[str, tuple[str | None, str | None]]
    decoder_layer_fuse: list[tuple[str, list[str]]] = field(default_factory=list)
    lm_head_fuse: list[tuple[str, str]] = field(default_factory=list)
    use_float64: bool = True
    # Norms over the residual width that are deliberately left alone (e.g. Mamba2's gated inner norm).
    ignore_norms: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rotation_matrices": {
                k: {"dim": m.dim, "mode": m.mode, "per_layer": m.per_layer}
                for k, m in self.rotation_matrices.items()
            },
            "rotation_config": {k: list(v) for k, v in self.rotation_config.items()},
            "norm_fuse_config": {
                "decoder_layer_fuse": [[n, list(t)] for n, t in self.decoder_layer_fuse],
                "lm_head_fuse": [list(p) for p in self.lm_head_fuse],
            },
            "use_float64": self.use_float64,
            "ignore_norms": list(self.ignore_norms),
        }

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ----------------------------------------------------------------------------------------------- loading


def load_layout(name_or_path: str | Path | dict | Layout) -> Layout:
    """Load a shipped layout by name, a YAML file by path, or a dict in the same schema."""
    if isinstance(name_or_path, Layout):
        return name_or_path
    if isinstance(name_or_path, dict | DictConfig):
        return _parse(OmegaConf.create(name_or_path), "custom")
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise LayoutError(f"layout file {text!r} does not exist")
        try:
            cfg = OmegaConf.load(path)
        except yaml.YAMLError as e:
            raise LayoutError(f"layout file {text!r} is not valid YAML: {e}") from e
        return _parse(cfg, path.stem)
    shipped = LAYOUT_DIR / f"{text}.yaml"
    if not shipped.is_file():
        raise LayoutError(
            f"unknown layout {text!r}: shipped layouts are {', '.join(shipped_layouts())}, "
            "or pass the path of a YAML file"
        )
    return _parse(OmegaConf.load(shipped), text)


_TOP_KEYS = {"rotation_matrices", "rotation_config", "norm_fuse_config", "use_float64", "ignore_norms", "name"}


def _parse(cfg: DictConfig, name: str) -> Layout:
    raw = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(raw, dict):
        raise LayoutError(f"layout {name!r} must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise LayoutError(f"layout {name!r}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(_TOP_KEYS)}")
    matrices: dict[str, MatrixSpec] = {}
    for mname, spec in (raw.get("rotation_matrices") or {}).items():
        if not isinstance(spec, dict) or "dim" not in spec:
            raise LayoutError(f"layout {name!r}: rotation_matrices.{mname} needs a 'dim'")
        mode = spec.get("mode", "hadamard")
        if mode not in MODES:
            raise LayoutError(f"layout {name!r}: rotation_matrices.{mname}.mode={mode!r}; use one of {MODES}")
        extra = set(spec) - {"dim", "mode", "per_layer"}
        if extra:
            raise LayoutError(f"layout {name!r}: rotation_matrices.{mname} has unknown key(s) {sorted(extra)}")
        matrices[mname] = MatrixSpec(mname, spec["dim"], mode, spec.get("per_layer", False))
    rot_cfg: dict[str, tuple[str | None, str | None]] = {}
    for pattern, pair in (raw.get("rotation_config") or {}).items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise LayoutError(
                f"layout {name!r}: rotation_config[{pattern!r}] must be [input_matrix, output_matrix], got {pair!r}"
            )
        for m in pair:
            if m is not None and m not in matrices:
                raise LayoutError(
                    f"layout {name!r}: rotation_config[{pattern!r}] names matrix {m!r}, "
                    f"not in rotation_matrices ({', '.join(matrices) or 'none'})"
                )
        rot_cfg[pattern] = (pair[0], pair[1])
    nf = raw.get("norm_fuse_config") or {}
    dec = [(str(n), [str(t) for t in (ts if isinstance(ts, list) else [ts])]) for n, ts in nf.get("decoder_layer_fuse", [])]
    head = [(str(n), str(t)) for n, t in nf.get("lm_head_fuse", [])]
    return Layout(
        name=str(raw.get("name", name)),
        rotation_matrices=matrices,
        rotation_config=rot_cfg,
        decoder_layer_fuse=dec,
        lm_head_fuse=head,
        use_float64=bool(raw.get("use_float64", True)),
        ignore_norms=list(raw.get("ignore_norms") or []),
    )


# ---------------------------------------------------------------------------------------- dims from config

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _config_value(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        value = getattr(obj, part, None)
        if value is None and hasattr(obj, "get_text_config") and obj is config:
            # Multimodal configs keep the language model's sizes in a nested text config.
            value = getattr(obj.get_text_config(), part, None)
        if value is None:
            raise LayoutError(f"config key {dotted!r} is missing from the model config ({type(config).__name__})")
        obj = value
    return obj


def resolve_dim(dim, config) -> int:
    """An int, a config key or an arithmetic expression of config keys -> int."""
    if isinstance(dim, int):
        return dim
    try:
        tree = ast.parse(str(dim), mode="eval").body
    except SyntaxError as e:
        raise LayoutError(f"dim {dim!r} is neither an int, a config key nor an expression of keys") from e

    def ev(node):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            # "head_dim or hidden_size // num_attention_heads": the first alternative the config has
            for alt in node.values[:-1]:
                try:
                    return ev(alt)
                except LayoutError:
                    pass
            return ev(node.values[-1])
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            return int(_config_value(config, ast.unparse(node)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise LayoutError(f"dim {dim!r}: only config keys, ints and + - * // are allowed")

    return int(ev(tree))


# ------------------------------------------------------------------------------------------ target matching


@dataclass
class Target:
    """One rotatable tensor: a weight (and maybe bias) with the axis that reads and the axis that writes."""

    name: str  # module name, or parameter name for bare parameters (MoE experts)
    weight: nn.Parameter
    bias: nn.Parameter | None
    in_axis: int | None  # axis multiplied by the input-side matrix (None: no input side, e.g. Embedding)
    out_axis: int  # axis multiplied by the output-side matrix
    module: nn.Module | None = None


BANK_ATTR = "spinlearn_rotations"  # where the learnable RotationBank hangs on a model during training


def addressable_targets(model: nn.Module) -> dict[str, Target]:
    """Every tensor a layout can name: Linear/Embedding modules and bare >=2-D parameters (never the
    rotation matrices themselves)."""
    targets: dict[str, Target] = {}
    owned: set[int] = set()
    bank = getattr(model, BANK_ATTR, None)
    if isinstance(bank, nn.Module):
        owned.update(id(p) for p in bank.parameters())
    for name, mod in model.named_modules():
        if name.split(".")[0] == BANK_ATTR:
            continue
        if isinstance(mod, nn.Embedding):
            targets[name] = Target(name, mod.weight, None, None, -1, mod)
            owned.add(id(mod.weight))
        elif isinstance(mod, nn.Linear) or (
            isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.ndim == 2 and not list(mod.children())
        ):
            # Linear, or a Linear-like leaf (e.g. a MoE router module holding a [experts, hidden] weight).
            bias = getattr(mod, "bias", None)
            targets[name] = Target(name, mod.weight, bias if isinstance(bias, nn.Parameter) else None, -1, -2, mod)
            owned.add(id(mod.weight))
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owned or p.ndim < 2 or name.endswith(".weight"):
            continue
        # transformers-5 fused MoE experts: [E, out, in] used as x @ W[e]^T, like stacked Linears.
        if p.ndim in (2, 3):
            targets[name] = Target(name, p, None, -1, -2, None)
    return targets


def match_pattern(pattern: str, names) -> list[str]:
    globs = [g.strip() for g in pattern.split("|") if g.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def no_match_error(pattern: str, names, what: str = "module") -> LayoutError:
    names = list(names)
    close: list[str] = []
    for g in pattern.split("|"):
        tail = g.strip().strip("*").split(".")[-1]
        close += difflib.get_close_matches(g.strip().strip("*"), names, n=3, cutoff=0.3)
        close += [n for n in names if tail and tail in n][:3]
    close = list(dict.fromkeys(close))[:6] or names[:6]
    return LayoutError(f"pattern {pattern!r} matches no {what} of the model; closest names: {', '.join(close)}")


def group_key(name: str, per_layer: bool | str, matrix: str) -> str:
    """Which instance of a matrix a module uses ('' = the shared one)."""
    if per_layer is False or per_layer is None:
        return ""
    parts = name.split(".")
    if per_layer is True:
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[: i + 1])
        raise LayoutError(
            f"matrix {matrix!r} is per_layer but module {name!r} has no layer index; "
            "give it a shared matrix or a per_layer glob"
        )
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, str(per_layer)):
            return prefix
    raise LayoutError(f"matrix {matrix!r}: per_layer glob {per_layer!r} matches no prefix of module {name!r}")


@dataclass
class Placement:
    """Where one matrix instance is applied: which target, which side."""

    target: Target
    side: str  # "input" | "output"
    matrix: str
    key: str  # instance key from group_key

    @property
    def instance(self) -> str:
        return f"{self.matrix}.{self.key}" if self.key else self.matrix


def resolve_placements(model: nn.Module, layout: Layout, dims: dict[str, int]) -> list[Placement]:
    """Match every rotation_config pattern and check that each matrix fits the axis it rotates."""
    targets = addressable_targets(model)
    placements: list[Placement] = []
    for pattern, (m_in, m_out) in layout.rotation_config.items():
        names = match_pattern(pattern, targets)
        if not names:
            raise no_match_error(pattern, targets)
        for name in names:
            t = targets[name]
            for side, m in (("input", m_in), ("output", m_out)):
                if m is None:
                    continue
                axis = t.in_axis if side == "input" else t.out_axis
                if axis is None:
                    raise LayoutError(f"module {name!r} ({type(t.module).__name__}) has no {side} side to rotate")
                size = t.weight.shape[axis]
                if size % dims[m]:
                    raise LayoutError(
                        f"matrix {m!r} of size {dims[m]} does not divide the {side} dimension of {name!r} "
                        f"(weight shape {tuple(t.weight.shape)}, {side} size {size})"
                    )
                key = group_key(name, layout.rotation_matrices[m].per_layer, m)
                placements.append(Placement(t, side, m, key))
    return placements


def resolve_dims(layout: Layout, config) -> dict[str, int]:
    dims = {}
    for name, spec in layout.rotation_matrices.items():
        try:
            dims[name] = resolve_dim(spec.dim, config)
        except LayoutError as e:  # say which matrix of which layout asked for the missing key
            raise LayoutError(f"layout {layout.name!r}, rotation_matrices.{name}.dim={spec.dim!r}: {e}") from e
    return dims

