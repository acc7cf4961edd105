"""``OUT/README.md``: a Hugging Face model card for an export (YAML front matter + Markdown).

Says what the checkpoint is (base model, scheme, recipe), how well the run measured it (the run's
``results.md`` table when there is one), which online transforms it needs, how to serve it with vLLM, and what
plain ``transformers`` does with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import METRICS_FILE, RESULTS_FILE
from .schemes import ExportScheme

_SCHEME_TEXT = {
    "w4a16": "int4 symmetric weights ({group}), 16-bit activations (compressed-tensors `pack-quantized`)",
    "w8a8": "int8 symmetric per-channel weights, int8 dynamic per-token activations (`int-quantized`)",
    "nvfp4": "NVFP4 W4A4: E2M1 weights and activations, FP8 E4M3 scales per 16, a global scale "
             "(`nvfp4-pack-quantized`; vLLM runs it on FP4-capable GPUs)",
    "float": "float weights (not quantized), for quantizing elsewhere; online transforms declared",
}


@dataclass
class CardInfo:
    """What the card reports: ``base_model`` (path or hub id), ``source`` (run or model directory), ``recipe``
    (YAML text), ``run_dir`` (for results.md / metrics.json) or ``results`` (the table itself), ``w_method``, ``notes``
    (serving warnings)."""

    base_model: str | None = None
    source: str | None = None
    recipe: str | None = None
    run_dir: Path | None = None
    w_method: str = "rtn"
    notes: list[str] = field(default_factory=list)
    results: str | None = None  # a results table (Markdown) given directly, e.g. by a run that is still going


def _results(info: CardInfo) -> str:
    if info.results:
        return info.results.strip()
    run_dir = info.run_dir
    if run_dir is None:
        return ""
    if (run_dir / RESULTS_FILE).is_file():
        return (run_dir / RESULTS_FILE).read_text().strip()
    if (run_dir / METRICS_FILE).is_file():
        return "```json\n" + json.dumps(json.loads((run_dir / METRICS_FILE).read_text()), indent=2) + "\n```"
    return ""


def _front_matter(info: CardInfo, scheme: ExportScheme) -> str:
    lines = ["---", "library_name: transformers", "tags:", "- spinlearn", "- compressed-tensors",
             f"- {scheme.name}", "- rotation"]
    if info.base_model:
        lines.append(f"base_model: {json.dumps(info.base_model)}")
    return "\n".join(lines + ["---", ""])


def _transforms_section(online: list[str]) -> str:
    if not online:
        return "No online transforms: the checkpoint computes the model's function on its own.\n"
    shown = ", ".join(f"`{n}`" for n in online[:4]) + (f" and {len(online) - 4} more" if len(online) > 4 else "")
    return (
        f"Online input Hadamards on {len(online)} linear layers ({shown}): their weights hold `W H` and the input "
        "must be multiplied by `H` at run time. This is declared in `quantization_config.transform_config` "
        "(group `spinlearn_online`, type `random-hadamard`, the +-1 matrix stored once per width as `<layer>."
        "spinlearn_online_input.weight`), which vLLM applies (dense GEMM; no tensor parallelism with online "
        "transforms). "
        "The Q/K Hadamard R3 is not exported: vLLM applies no query/key transforms; it is exact in float, so "
        "leaving it out only gives up its benefit to a quantized KV cache.\n"
    )


def model_card(info: CardInfo, scheme: ExportScheme, online: list[str]) -> str:
    """The README.md text."""
    what = _SCHEME_TEXT[scheme.name].format(
        group="per output channel" if scheme.group_size <= 0 else f"groups of {scheme.group_size}")
    method = {"rtn": "round-to-nearest", "gptq": "GPTQ"}.get(info.w_method, info.w_method)
    parts = [
        _front_matter(info, scheme),
        f"# {Path(info.source).name if info.source else 'model'} ({scheme.name})\n",
        f"Rotated with spinlearn (learned / Hadamard rotations folded into the weights) and "
        f"exported as **{scheme.name}**: {what}."
        + (f" Weights quantized with {method}, the same values spinlearn's evaluation measured." if scheme.quantized
           else "") + "\n",
        f"- base model: `{info.base_model or 'unknown'}`\n- exported from: `{info.source or 'unknown'}`\n",
        "## Results of the run\n\n" + (_results(info) or "No results table (exported from a model directory).")
        + "\n",
        "## Online transforms\n\n" + _transforms_section(online),
        "## Serving\n\n```bash\npip install vllm\nvllm serve PATH_TO_THIS_DIRECTORY\n```\n\n"
        "```python\nfrom vllm import LLM\nllm = LLM(\"PATH_TO_THIS_DIRECTORY\")\n"
        "print(llm.generate(\"Hello\")[0].outputs[0].text)\n```\n",
        "## Loading in transformers\n\n"
        + ("**Warning:** plain `AutoModelForCausalLM.from_pretrained` loads this checkpoint without error but "
           "ignores `transform_config` (transformers 5.x), so the layers above compute the wrong function. "
           "Evaluate with `spinlearn eval --model PATH`, which applies the transforms "
           "(`spinlearn.export.load_export`), or serve with vLLM.\n" if online else
           "`AutoModelForCausalLM.from_pretrained` loads it (with `compressed-tensors` installed) and computes "
           "the same function.\n"),
    ]
    if info.notes:
        parts.append("## Serving notes\n\n" + "\n".join(f"- {n}" for n in info.notes) + "\n")
    if info.recipe:
        parts.append("## Recipe\n\n```yaml\n" + info.recipe.strip() + "\n```\n")
    return "\n".join(parts)
