"""Tiny random-weight models built from configs (no downloads), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]  # the repository


def launch_script(name: str):
    """``launch/NAME.py`` loaded as a module (the launch scripts are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# family -> (config class name, layout, config kwargs)
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "transformer_universal",
              dict(_COMMON, intermediate_size=172 * 2, tie_word_embeddings=True, head_dim=16)),
    "qwen2": ("Qwen2Config", "transformer_universal", dict(_COMMON, intermediate_size=96, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "transformer_universal", dict(_COMMON, intermediate_size=96, head_dim=16)),
    "mistral": ("MistralConfig", "transformer_universal", dict(_COMMON, intermediate_size=96, head_dim=16)),
    "mixtral": ("MixtralConfig", "transformer_universal",
                dict(_COMMON, intermediate_size=48, num_local_experts=3, num_experts_per_tok=2, head_dim=16)),
    "gemma": ("GemmaConfig", "transformer_universal", dict(_COMMON, intermediate_size=96, head_dim=16)),
    "phi3": ("Phi3Config", "phi3", dict(_COMMON, intermediate_size=96, pad_token_id=0)),
    "nemotron_h": ("NemotronHConfig", "nemotron_h",
                   dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        hybrid_override_pattern="M*-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=1, mamba_d_conv=4,
                        mamba_expand=2, max_position_embeddings=128)),
    "opt": ("OPTConfig", "opt", dict(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)),
}


def tiny_config(family: str, **overrides):
    import transformers

    cls_name, _, kwargs = FAMILIES[family]
    kw = dict(kwargs, **overrides)
    if family in ("qwen2", "qwen3", "mistral", "mixtral", "gemma", "llama", "phi3", "nemotron_h", "opt"):
        kw.setdefault("bos_token_id", 1)
        kw.setdefault("eos_token_id", 2)
        kw.setdefault("pad_token_id", 0)
    return getattr(transformers, cls_name)(**kw)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised model; norms get non-trivial weights so that norm fusion is really exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"experts_implementation": "eager"} if family == "mixtral" else {}
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                p.add_(0.3 * torch.randn_like(p))  # init is all ones/zeros: make the scales and biases matter
            elif p.ndim == 1 and name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def layout_for(family: str) -> str:
    return FAMILIES[family][1]


def float64_exact_norms(model) -> None:
    """Make RMSNorm modules compute in the input dtype instead of upcasting to float32.

    Hugging Face RMSNorms compute their variance in float32 even for float64 inputs, which caps a float64
    invariance check at ~1e-7. Tests that check rotations to 1e-9 swap in the same formula in float64."""
    import types

    from spinlearn.fusion import inspect_norm

    for mod in model.modules():
        cls = type(mod).__name__
        if "RMSNorm" not in cls or "Gated" in cls or getattr(mod, "weight", None) is None:
            continue
        plus_one = inspect_norm(mod).plus_one
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))

        def forward(self, x, _eps=eps, _plus=plus_one):
            scale = self.weight + 1.0 if _plus else self.weight
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps) * scale.to(x.dtype)

        mod.forward = types.MethodType(forward, mod)


@torch.no_grad()
def logits_in_model_dtype(model, input_ids):
    """Logits without a final cast (some models return float32 logits even for a float64 model)."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    return model.get_output_embeddings()(hidden)


def save_tiny_model_dir(path, family: str = "llama", tokenizer_dir=None, seed: int = 0, **overrides):
    """A tiny random model saved as a Hugging Face directory with a real tokenizer (the demo's by default)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer_dir = tokenizer_dir or Path(__file__).resolve().parents[1] / "spinlearn" / "demo" / "model"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = tiny_model(family, seed=seed, vocab_size=len(tok), **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return Path(path)


def save_remote_code_model_dir(path, seed: int = 0):
    """``save_tiny_model_dir``'s Llama as a model with custom code (``auto_map``): its config and model classes are
    subclasses defined in files beside the weights, loadable only with trust_remote_code."""
    import json

    path = save_tiny_model_dir(path, "llama", seed=seed)
    (path / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (path / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


TINY_WORDS = "the a cat dog sat on mat ran fast slow big small red blue green house tree car road sun".split()


def tiny_tokenizer():
    """A WordLevel tokenizer over ~20 words, built locally (no hub); ids fit the tiny models' vocab of 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(TINY_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )



class DumpRankRotations(TrainerCallback):
    """At the end of training every rank writes the matrices it holds to DIR/rank{i}.safetensors, so that a
    multi-process run can be checked for ranks that drifted apart (injected into the job as a callback)."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        from spinlearn.fakequant import BANK_ATTR, activation_clip_table, weight_clip_table
        from spinlearn.scales import SCALES_ATTR

        tensors = dict(getattr(model, BANK_ATTR).matrices())
        scales = getattr(model, SCALES_ATTR, None)  # learned scales and clip ratios too, when the recipe has them
        tensors.update({f"scale.{k}": v for k, v in (scales.scales() if scales is not None else {}).items()})
        tensors.update({f"clip.{k}": v.reshape(1) for k, v in activation_clip_table(model).items()})
        tensors.update({f"wclip.{k}": v for k, v in weight_clip_table(model).items()})
        self.directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(self.directory / f"rank{args.process_index}.safetensors"))


class DumpShardInfo(TrainerCallback):
    """Every rank writes DIR/shards{i}.json at the end of training: how many of the model's parameters were DTensors
    at the start and how many elements it held locally vs in full (FSDP shards the frozen weights), and what the
    first rotated weight's parametrization read inside a forward pass (FSDP must have all-gathered it by then)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.info: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        self.info = {"params": len(params), "dtensors": len(sharded),
                     "local_numel": sum(p.to_local().numel() for p in sharded),
                     "full_numel": sum(p.numel() for p in sharded),
                     "trainable_dtensors": sum(p.requires_grad for p in sharded)}
        self.hook = None
        found = next(((n, m) for n, m in model.named_modules()
                      if ".layers.0." in n and hasattr(m, "parametrizations")), None)
        if found is None:  # the matrices act on the activations (rotation.apply): no weight is parametrized
            return
        name, module = found
        stored = module.parametrizations.weight.original
        local = stored.to_local() if isinstance(stored, DTensor) else stored
        self.info.update(probe=name, stored_type=type(stored).__name__, stored_shape=list(stored.shape),
                         stored_local_shape=list(local.shape))

        def record(mod, _args):
            seen = mod.parametrizations.weight.original
            self.info.setdefault("seen_in_forward", [type(seen).__name__, list(seen.shape)])

        self.hook = module.register_forward_pre_hook(record)

    def on_train_end(self, args, state, control, **kwargs):
        import json

        if self.hook is not None:
            self.hook.remove()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"shards{args.process_index}.json").write_text(json.dumps(self.info))


def loss_on_both_sides(family: str, device: str, dtype, *, seed: int = 0):
    """The W16A4KV4 loss of one batch with the same start matrices, the matrices on the weights and on the
    activations (``rotation.apply``), for a tiny model on ``device`` in ``dtype``: (weight side, activation side)."""
    from spinlearn.fakequant import rotations_attached
    from spinlearn.online import online_linears
    from spinlearn.quant import QuantSettings
    from spinlearn.rotation_plan import make_matrices, prepare_model

    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    losses = []
    for on_activations in (False, True):
        model = tiny_model(family, seed=seed).to(device, dtype)
        plan = prepare_model(model, layout_for(family))
        with rotations_attached(model, plan, make_matrices(plan, mode="hadamard", seed=seed),
                                quant=QuantSettings.from_flags(a_bits=4, kv_bits=4), r3=True,
                                online=online_linears(model, r4=True), rotate_activations=on_activations):
            with torch.no_grad():
                losses.append(model(input_ids=ids, labels=ids).loss.float().item())
    return tuple(losses)
