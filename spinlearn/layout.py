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

ModelOpt's layouts work unchanged; their conventions are translated with a note (a ``LayoutNote`` warning,
once per message): ``"*embed_tokens": [r1, null]`` (an Embedding's first entry rotates its hidden side),
bare norm names (``input_layernorm``: any module whose name ends with it) and ``dim: head_dim`` on configs
without one (``hidden_size // num_attention_heads``, as transformers does). A pattern that matches nothing is
skipped with a note when it names another family's module (its last name is one a known layout uses and the
model has nothing at its parent path: ``*in_proj`` on a Llama); otherwise (``*mlp.wi``, ``*self_attn.qkv_proj``
on a Llama) or when a skip leaves a matrix with no reader or no writer, it is an error.
``check_layout_for_config`` validates a layout against a model's config alone (before weights are loaded).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import fnmatch
import functools
import operator
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .choices import ROTATION_MODES as MODES
from torch import nn

LAYOUT_DIR = Path(__file__).parent / "layouts"
MAX_DIM = 1 << 20  # no rotation matrix is larger than this (a 2^20 x 2^20 float64 matrix is 8 TiB)


class LayoutError(ValueError):
    """A layout that does not fit the model (or is malformed)."""


class LayoutNote(UserWarning):
    """A layout convention translated (ModelOpt's) or a pattern skipped / completed; shown once per message."""


_NOTE_SCOPES: list[set[str]] = []


@contextlib.contextmanager
def notes_once():
    """Within this block each distinct note is shown once (one rotation resolves a layout several times)."""
    _NOTE_SCOPES.append(set())
    try:
        yield
    finally:
        _NOTE_SCOPES.pop()


_NOTE_REGISTRY: dict = {}


def note(message: str) -> None:
    """Show a LayoutNote as ``spinlearn:0: LayoutNote: message`` (no source line), once per message."""
    if _NOTE_SCOPES:
        if message in _NOTE_SCOPES[-1]:
            return
        _NOTE_SCOPES[-1].add(message)
    warnings.warn_explicit(message, LayoutNote, "spinlearn", 0, module="spinlearn.layout", registry=_NOTE_REGISTRY)


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
    if text == "auto":
        raise LayoutError(
            "layout 'auto' is inferred from a model, not loaded: pass it to rotate()/prepare_model(), "
            "or call spinlearn.layout_infer.infer_layout(model)"
        )
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
    name = str(raw.get("name", name))
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
        if isinstance(spec["dim"], bool | float):
            raise LayoutError(f"{_where(name, mname, spec['dim'])} is not an integer; {_DIM_HINT}")
        if isinstance(spec["dim"], int):
            check_dim_value(spec["dim"], _where(name, mname, spec["dim"]))
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
    dec = [(str(n), [str(t) for t in (ts if isinstance(ts, list) else [ts])])
           for n, ts in _norm_entries(name, nf, "decoder_layer_fuse")]
    head = [(str(n), str(t)) for n, t in _norm_entries(name, nf, "lm_head_fuse")]
    return Layout(
        name=str(raw.get("name", name)),
        rotation_matrices=matrices,
        rotation_config=rot_cfg,
        decoder_layer_fuse=dec,
        lm_head_fuse=head,
        use_float64=bool(raw.get("use_float64", True)),
        ignore_norms=list(raw.get("ignore_norms") or []),
    )


def _norm_entries(name: str, nf: dict, key: str) -> list:
    entries = nf.get(key) or []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise LayoutError(
                f"layout {name!r}: norm_fuse_config.{key} entry {entry!r} must be [norm, readers] "
                "(e.g. [input_layernorm, [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj]])"
            )
    return entries


# ---------------------------------------------------------------------------------------- dims from config

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_DIM_HINT = "use an int, a config key (hidden_size, head_dim) or an expression (hidden_size // num_attention_heads)"


def _is_config(obj) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type")


def _config_value(config, dotted: str, fallback: bool = True):
    obj = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if i and not _is_config(obj):
            raise LayoutError(
                f"config key {dotted!r}: {'.'.join(parts[:i])!r} is {obj!r} ({type(obj).__name__}), not a nested "
                "config; attribute chains only go through nested configs (e.g. text_config.hidden_size)"
            )
        value = getattr(obj, part, None)
        if value is None and hasattr(obj, "get_text_config") and obj is config:
            # Multimodal configs keep the language model's sizes in a nested text config.
            value = getattr(obj.get_text_config(), part, None)
        if value is None and dotted == "head_dim" and fallback:
            return _default_head_dim(config)
        if value is None:
            raise LayoutError(f"config key {dotted!r} is missing from the model config ({type(config).__name__})")
        obj = value
    return obj


def _default_head_dim(config) -> int:
    """ModelOpt layouts say ``head_dim``; configs without it (Qwen2) mean hidden_size // num_attention_heads."""
    try:
        value = int(_config_value(config, "hidden_size")) // int(_config_value(config, "num_attention_heads"))
    except LayoutError:
        raise LayoutError(f"config key 'head_dim' is missing from the model config ({type(config).__name__})") from None
    note(f"config has no head_dim: using hidden_size // num_attention_heads = {value} (as transformers does)")
    return value


def _as_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"config key {key!r} is {value!r} ({type(value).__name__}), not an integer size")
    return value


def resolve_dim(dim, config) -> int:
    """An int, a config key or an arithmetic expression of config keys -> int (not yet range-checked)."""
    if isinstance(dim, bool) or isinstance(dim, float):
        raise LayoutError(f"dim {dim!r} is not an integer; {_DIM_HINT}")
    if isinstance(dim, int):
        return dim
    try:
        tree = ast.parse(str(dim), mode="eval").body
    except SyntaxError as e:
        raise LayoutError(f"dim {dim!r} is neither an int, a config key nor an expression of keys; {_DIM_HINT}") from e

    def ev(node, fallback=True):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            # "head_dim or hidden_size // num_attention_heads": the first alternative the config has
            for alt in node.values[:-1]:
                try:
                    return ev(alt, fallback=False)
                except LayoutError:
                    pass
            return ev(node.values[-1])
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            key = ast.unparse(node)
            return _as_int(_config_value(config, key, fallback), key)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left, fallback), ev(node.right, fallback)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise LayoutError(f"dim {dim!r} divides by zero ({ast.unparse(node.right)} = 0)")
            return _BINOPS[type(node.op)](left, right)
        raise LayoutError(f"dim {dim!r}: only config keys, ints and + - * // are allowed")

    return int(ev(tree))


def check_dim_value(value: int, where: str) -> int:
    """A resolved size must be a positive int no larger than MAX_DIM; ``where`` names layout, matrix and dim."""
    if value <= 0:
        raise LayoutError(f"{where} is {value}: a rotation size must be positive; {_DIM_HINT}")
    if value > MAX_DIM:
        raise LayoutError(
            f"{where} is {value}, larger than any axis a rotation acts on (limit {MAX_DIM}); {_DIM_HINT}"
        )
    return value


def _where(layout_name: str, matrix: str, dim) -> str:
    return f"layout {layout_name!r}, rotation_matrices.{matrix}.dim={dim!r}"


def resolve_dims(layout: Layout, config) -> dict[str, int]:
    dims = {}
    for name, spec in layout.rotation_matrices.items():
        where = _where(layout.name, name, spec.dim)
        try:
            value = resolve_dim(spec.dim, config)
        except LayoutError as e:  # say which matrix of which layout asked for the missing key
            raise LayoutError(f"{where}: {e}") from e
        dims[name] = check_dim_value(value, where if isinstance(spec.dim, int) else f"{where} (= {value})")
    return dims


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


def addressable_targets(model: nn.Module, skip: Collection[str] = ()) -> dict[str, Target]:
    """Every tensor a layout can name: Linear/Embedding modules and bare >=2-D parameters. ``skip`` names
    top-level child modules that are not part of the model (e.g. a training job's rotation matrices)."""
    targets: dict[str, Target] = {}
    owned: set[int] = set()
    for attr in skip:
        extra = getattr(model, attr, None)
        if isinstance(extra, nn.Module):
            owned.update(id(p) for p in extra.parameters())
    for name, mod in model.named_modules():
        if name.split(".")[0] in skip:
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
        if id(p) in owned or p.ndim < 2 or name.endswith(".weight") or name.split(".")[0] in skip:
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
    """Match every rotation_config pattern and check that each matrix fits the axis it rotates.

    A pattern that matches nothing is an error, unless it names another family's modules (a universal layout
    on a family that lacks them, e.g. ``*in_proj`` on a Llama): then it is skipped with a note."""
    targets = addressable_targets(model)
    placements: list[Placement] = []
    skipped: list[str] = []
    for pattern, (m_in, m_out) in layout.rotation_config.items():
        names = match_pattern(pattern, targets)
        if not names:
            if not all(other_family_glob(g, targets) for g in _globs(pattern)):
                raise no_match_error(pattern, targets)
            note(f"layout {layout.name!r}: pattern {pattern!r} matches nothing in {type(model).__name__} "
                 "(modules of another family): skipped")
            skipped.append(pattern)
            continue
        for name in names:
            for side, m in _sides(targets[name], pattern, m_in, m_out, layout.name):
                placements.append(_placement(targets[name], side, m, layout, dims))
    if skipped:
        _check_two_sided(placements, layout, skipped)
    return placements


def _sides(t: Target, pattern: str, m_in, m_out, layout_name: str):
    if t.in_axis is None and m_in is not None and m_out is None:
        # ModelOpt's convention: an Embedding's first entry rotates its weight's last (hidden) axis.
        note(f"layout {layout_name!r}: {pattern!r}: [{m_in}, null] on {type(t.module).__name__} {t.name!r} "
             f"rotates its hidden side (ModelOpt's convention), read as [null, {m_in}]")
        return [("output", m_in)]
    return [(side, m) for side, m in (("input", m_in), ("output", m_out)) if m is not None]


def _placement(t: Target, side: str, m: str, layout: Layout, dims: dict[str, int]) -> Placement:
    axis = t.in_axis if side == "input" else t.out_axis
    if axis is None:
        raise LayoutError(f"module {t.name!r} ({type(t.module).__name__}) has no {side} side to rotate")
    size = t.weight.shape[axis]
    if size % dims[m]:
        larger = f"; {dims[m]} is larger than the axis" if dims[m] > size else ""
        raise LayoutError(
            f"matrix {m!r} of size {dims[m]} does not divide the {side} dimension of {t.name!r} "
            f"(weight shape {tuple(t.weight.shape)}, {side} size {size}){larger}: layout {layout.name!r} needs "
            f"rotation_matrices.{m}.dim (now {layout.rotation_matrices[m].dim!r}) to divide {size}"
        )
    return Placement(t, side, m, group_key(t.name, layout.rotation_matrices[m].per_layer, m))


def _check_two_sided(placements: list[Placement], layout: Layout, skipped: list[str]) -> None:
    """After skipping patterns, every matrix still used must be read and written (else it was a typo)."""
    for m in layout.rotation_matrices:
        sides = {p.side for p in placements if p.matrix == m}
        if len(sides) == 1:
            missing = "writes (output side)" if sides == {"input"} else "reads (input side)"
            raise LayoutError(
                f"layout {layout.name!r}: with {skipped} matching nothing, no module {missing} matrix {m!r}, so "
                "the rotation cannot cancel; check those patterns for typos"
            )


# ------------------------------------------------------------------------------- other families' names

# Module names of ModelOpt's universal layout that no shipped layout uses (old Mixtral experts).
_MODELOPT_ONLY_NAMES = ("w1", "w2", "w3")


def _globs(pattern: str) -> list[str]:
    return [g.strip() for g in pattern.split("|") if g.strip()]


def _tail(glob: str) -> str:
    return glob.strip().split(".")[-1].lstrip("*")


@functools.cache
def known_module_names() -> frozenset[str]:
    """Last name components of every module a shipped layout (or ModelOpt's universal layout) addresses."""
    names = set(_MODELOPT_ONLY_NAMES)
    for path in LAYOUT_DIR.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text()) or {}
        patterns = list(raw.get("rotation_config") or {})
        nf = raw.get("norm_fuse_config") or {}
        for norm, readers in nf.get("decoder_layer_fuse", []) + nf.get("lm_head_fuse", []):
            patterns += [norm, *(readers if isinstance(readers, list) else [readers])]
        names.update(_tail(g) for pat in patterns for g in _globs(pat))
    return frozenset(names)


def other_family_glob(glob: str, names) -> bool:
    """Does a glob that matches nothing name another family's module (rather than a typo)? Yes when its last
    component is a module name some known family uses and the model has no module at the glob's parent path
    (``*mixer.in_proj`` on a Llama); ``*self_attn.qkv_proj`` on a Llama, whose self_attn exists, is a typo."""
    if _tail(glob) not in known_module_names():
        return False
    if "." not in glob.strip():
        return True
    parent = glob.strip().rsplit(".", 1)[0]
    return not any(fnmatch.fnmatchcase(n.rsplit(".", 1)[0], parent) for n in names if "." in n)


# ------------------------------------------------------------------------------------------------- norms


def match_norms(pattern: str, modules, layout_name: str) -> list[str]:
    """Names of the norm modules a norm_fuse_config pattern addresses. A bare name that is no module's full
    name means, as in ModelOpt, any module whose name ends with it (``input_layernorm``)."""
    found = match_pattern(pattern, modules)
    if found:
        return found
    read = "|".join(g if any(c in g for c in "*?[") else f"*.{g}" for g in _globs(pattern))
    found = match_pattern(read, modules)
    if found:
        note(f"layout {layout_name!r}: norm name {pattern!r} read as {read!r} (ModelOpt: names ending with it)")
        return found
    if all(_tail(g) in known_module_names() for g in _globs(pattern)):
        note(f"layout {layout_name!r}: norm pattern {pattern!r} matches nothing (another family's norm): skipped")
        return []
    norms = [n for n, m in dict(modules).items() if "norm" in type(m).__name__.lower()]
    raise no_match_error(pattern, norms, "norm")


# ----------------------------------------------------------------------------------------- config alone


def check_layout_for_config(layout: str | Path | dict | Layout, config) -> Layout | None:
    """Validate a layout (shipped name, file, dict or Layout) against a model's config alone, before data or
    weights are loaded: every dim resolves to a positive size <= MAX_DIM, the matrix lm_head reads (the
    residual stream's) divides hidden_size, and a matrix on v_proj's output divides its width
    (num_key_value_heads * head_dim). Returns the layout; ``"auto"`` returns None (it is inferred from the
    loaded model) after checking that the config has a hidden_size."""
    if layout == "auto":
        check_dim_value(_as_int(_config_value(config, "hidden_size"), "hidden_size"), "auto layout: hidden_size")
        return None
    lay = load_layout(layout)
    dims = resolve_dims(lay, config)
    for pattern, (m_in, m_out) in lay.rotation_config.items():
        if m_in is not None and match_pattern(pattern, ["lm_head", "model.lm_head"]):
            _must_divide(lay, m_in, dims[m_in], "hidden_size", config, "the residual stream (lm_head's input)")
        if m_out is not None and any(_tail(g).endswith("v_proj") for g in _globs(pattern)):
            _must_divide(lay, m_out, dims[m_out], _V_WIDTH, config, "v_proj's output")
    return lay


_V_WIDTH = "num_key_value_heads * (head_dim or hidden_size // num_attention_heads)"


def _must_divide(lay: Layout, matrix: str, dim: int, expr: str, config, what: str) -> None:
    try:
        width = resolve_dim(expr, config)
    except LayoutError:
        return  # not knowable from this config: checked against the weights later
    if width % dim:
        raise LayoutError(
            f"{_where(lay.name, matrix, lay.rotation_matrices[matrix].dim)} is {dim}, which does not divide "
            f"{what} ({expr} = {width}); use a size that divides {width}, e.g. "
            f"{'head_dim' if 'v_proj' in what else 'hidden_size'}"
        )
