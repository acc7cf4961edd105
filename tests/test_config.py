"""Recipe schema: shipped recipes, overrides, helpful errors, TrainingArguments glue."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spinlearn.config import (
    LR_SCHEDULERS,
    RECIPE_DIR,
    RESERVED_TRAIN_KEYS,
    RecipeConfig,
    TrainConfig,
    RecipeError,
    load_recipe,
    recipe_to_yaml,
    training_arguments_fields,
    training_arguments_kwargs,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))  # shipped inside the package; recipes/ links there
BIT_KEYS = ["quant.w_bits", "quant.a_bits", "quant.kv_bits", "quant.lm_head_bits", "quant.gptq.w_bits"]

MINIMAL = {
    "model": {"path": "some/model"},
    "data": {"train": "data/train.txt"},
    "train": {"max_steps": 10},
    "output_dir": "runs/x",
}


def write(tmp_path: Path, cfg: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def test_recipes_are_shipped():
    assert (ROOT / "recipes").resolve() == RECIPE_DIR  # the README's `--config recipes/demo.yaml` keeps working
    assert RECIPE_DIR == ROOT / "spinlearn" / "recipes"
    names = {p.stem for p in RECIPES}
    for model in ("llama3_8b", "llama3_2_1b", "qwen2_5_7b", "qwen3_8b"):
        assert {f"{model}_w4a4kv4", f"{model}_w16a4kv4"} <= names
    assert {"llama3_70b_w4a4kv4", "qwen2_5_72b_w4a4kv4"} <= names  # FSDP (tests/test_memplan.py: their plan)
    assert "demo" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path):
    cfg = load_recipe(path)
    assert OmegaConf.get_type(cfg) is RecipeConfig
    assert cfg.train.max_steps > 0
    # The saved (resolved) YAML must load back to the same recipe.
    again = load_recipe(write(tmp_path, OmegaConf.create(recipe_to_yaml(cfg)), "again.yaml"))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    # Every key written in the file took effect (nothing silently dropped or defaulted).
    raw = OmegaConf.load(path)
    for key in _leaf_keys(OmegaConf.to_container(raw)):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(raw, key), key


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_is_its_launch_command(path: Path):
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(
        r"# accelerate launch (?:--config_file (accelerate_configs/\S+\.yaml) )?"
        r"launch/train_rotations\.py --config recipes/(\S+\.yaml)",
        first,
    )
    assert m, f"{path.name}: first line is not a launch command: {first!r}"
    assert m.group(2) == path.name
    if m.group(1):
        assert (ROOT / m.group(1)).is_file(), m.group(1)


@pytest.mark.parametrize("path", [p for p in RECIPES if re.search(r"_w\d+a\d+kv\d+$", p.stem)], ids=lambda p: p.name)
def test_recipe_bits_match_its_name(path: Path):
    w, a, kv = map(int, re.search(r"_w(\d+)a(\d+)kv(\d+)$", path.stem).groups())
    q = load_recipe(path).quant
    assert (q.w_bits, q.a_bits, q.kv_bits) == (w, a, kv)
    if w == 16:  # trained with float weights: GPTQ must quantize them afterwards
        assert q.w_method == "gptq" and q.gptq.w_bits is not None and q.gptq.w_bits < 16
    else:
        assert q.w_method == "rtn"


def test_overrides_apply_after_file(tmp_path: Path):
    path = write(tmp_path, {**MINIMAL, "quant": {"a_bits": 6}})
    cfg = load_recipe(path, ["train.max_steps=5", "quant.a_bits=8", "train.report_to=[none]", "data.eval=e.jsonl"])
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.quant.a_bits == 8
    assert list(cfg.train.report_to) == ["none"]
    assert cfg.data.eval == "e.jsonl"
    assert cfg.quant.w_bits == RecipeConfig().quant.w_bits  # untouched keys keep the schema default
    # A later override wins over an earlier one; a bare string is accepted for report_to.
    cfg = load_recipe(path, ["train.max_steps=5", "train.max_steps=7", "train.report_to=none"])
    assert cfg.train.max_steps == 7 and list(cfg.train.report_to) == ["none"]


def test_no_file_only_overrides():
    cfg = load_recipe(None, ["model.path=m", "data.train=c4", "output_dir=o", "train.max_steps=3"])
    assert (cfg.model.path, cfg.data.train, cfg.output_dir, cfg.train.max_steps) == ("m", "c4", "o", 3)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe("recipes/nope.yaml")


@pytest.mark.parametrize(
    "section, bad, good",
    [("train", "lerning_rate", "learning_rate"), ("quant", "a_bit", "a_bits"), ("quant.gptq", "nsampels", "nsamples")],
)
def test_misspelt_key_in_file(tmp_path: Path, section: str, bad: str, good: str):
    cfg = OmegaConf.create(MINIMAL)
    OmegaConf.update(cfg, f"{section}.{bad}", 1, force_add=True)
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, OmegaConf.to_container(cfg)))
    msg = str(e.value)
    assert f"'{section}.{bad}'" in msg and f"'{section}.{good}'" in msg and "r.yaml" in msg


def test_misspelt_key_in_override(tmp_path: Path):
    with pytest.raises(ValueError) as e:
        load_recipe(write(tmp_path, MINIMAL), ["train.lerning_rate=0.5"])
    msg = str(e.value)
    assert "'train.lerning_rate'" in msg and "'train.learning_rate'" in msg and "override" in msg


def test_key_in_wrong_section_suggests_the_right_one(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"'quant\.w_bits'"):
        load_recipe(write(tmp_path, MINIMAL), ["train.w_bits=3"])


@pytest.mark.parametrize("text", ["train.max_steps", "=3", "quant=4"])
def test_malformed_override(tmp_path: Path, text: str):
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, MINIMAL), [text])


def test_wrong_type_names_the_key(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"quant\.w_bits.*four"):
        load_recipe(write(tmp_path, MINIMAL), ["quant.w_bits=four"])


@pytest.mark.parametrize("key", BIT_KEYS)
@pytest.mark.parametrize("bits", [1, 17])
def test_bits_out_of_range(tmp_path: Path, key: str, bits: int):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL), [f"{key}={bits}"])
    assert key in str(e.value) and "2..16" in str(e.value)


@pytest.mark.parametrize("key", BIT_KEYS)
@pytest.mark.parametrize("bits", [2, 16])
def test_bits_at_range_ends_accepted(tmp_path: Path, key: str, bits: int):
    assert OmegaConf.select(load_recipe(write(tmp_path, MINIMAL), [f"{key}={bits}"]), key) == bits


@pytest.mark.parametrize("override", [[], ["train.max_steps=0"], ["train.max_steps=-1"]])
def test_max_steps_must_be_set(tmp_path: Path, override: list[str]):
    recipe = {k: v for k, v in MINIMAL.items() if k != "train"}
    with pytest.raises(RecipeError, match=r"train\.max_steps: max_steps must be > 0: rotation training is step-based"):
        load_recipe(write(tmp_path, recipe), override)


@pytest.mark.parametrize("key", ["model.path", "data.train", "output_dir"])
def test_required_keys_named(tmp_path: Path, key: str):
    recipe = OmegaConf.create(MINIMAL)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(recipe, parent) if parent else recipe
    del node[leaf]
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, OmegaConf.to_container(recipe)))
    assert f"{key}: missing required value" in str(e.value)
    others = {"model.path", "data.train", "output_dir"} - {key}
    assert not any(f"{o}:" in str(e.value) for o in others)


@pytest.mark.parametrize(
    "key, bad, choice",
    [
        ("rotation.init", "random", "base_hadamard"),
        ("rotation.optimizer", "adam", "riemannian_adam"),
        ("quant.w_method", "awq", "gptq"),
        ("model.dtype", "fp16", "bfloat16"),
        ("train.lr_scheduler_type", "cosin", "cosine"),
        ("rotation.layout", "transformer_univrsal", "transformer_universal"),
        ("data.train", "train.csv", "wikitext2"),
    ],
)
def test_enum_like_values(tmp_path: Path, key: str, bad: str, choice: str):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL), [f"{key}={bad}"])
    assert key in str(e.value) and bad in str(e.value) and choice in str(e.value)
    load_recipe(write(tmp_path, MINIMAL), [f"{key}={choice}"])


def test_every_problem_reported_at_once(tmp_path: Path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL), ["quant.a_bits=1", "rotation.init=x", "train.max_steps=0"])
    for key in ("quant.a_bits", "rotation.init", "train.max_steps"):
        assert key in str(e.value)


def test_paths_need_not_exist(tmp_path: Path):
    cfg = load_recipe(write(tmp_path, MINIMAL), ["data.train=/does/not/exist/*.jsonl", "model.path=/nope"])
    assert cfg.data.train == "/does/not/exist/*.jsonl"


def test_layout_path_accepted(tmp_path: Path):
    assert load_recipe(write(tmp_path, MINIMAL), ["rotation.layout=my/layout.yaml"]).rotation.layout == "my/layout.yaml"


def test_validate_plain_dict_and_interpolation():
    cfg = validate({**MINIMAL, "train": {"max_steps": 4, "run_name": "${output_dir}"}})
    assert OmegaConf.get_type(cfg) is RecipeConfig
    assert "run_name: runs/x" in recipe_to_yaml(cfg)
    with pytest.raises(RecipeError, match="trian"):
        validate({**MINIMAL, "trian": {}})


def test_lr_schedulers_known_to_transformers():
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_arguments_construct(tmp_path: Path, checkpointing: bool):
    import torch
    from transformers import TrainingArguments

    demo = OmegaConf.load(RECIPE_DIR / "demo.yaml")
    demo.output_dir = str(tmp_path / "out")
    cfg = load_recipe(write(tmp_path, OmegaConf.to_container(demo)), [f"train.gradient_checkpointing={checkpointing}"])
    kwargs = training_arguments_kwargs(cfg)
    assert "resume_from_checkpoint" not in kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument names
        args = TrainingArguments(**kwargs)
    train = OmegaConf.to_container(cfg.train)
    for key in ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "warmup_steps", "weight_decay", "seed", "bf16", "logging_steps", "save_steps",
                "save_total_limit", "dataloader_num_workers", "run_name"):  # fmt: skip
        assert getattr(args, key) == train[key], key
    assert str(args.lr_scheduler_type.value) == train["lr_scheduler_type"]
    assert args.report_to == train["report_to"]
    assert args.gradient_checkpointing is checkpointing
    assert args.output_dir == cfg.output_dir
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    assert args.use_cpu is (not torch.cuda.is_available())


# ------------------------------------------------------------------------ train.*: TrainingArguments passthrough
def test_any_training_arguments_field_passes_through(tmp_path: Path):
    from transformers import TrainingArguments

    extra = {"dataloader_drop_last": True, "max_grad_norm": 2, "eval_strategy": "steps", "eval_steps": 5,
             "lr_scheduler_kwargs": {"min_lr": 0.01}, "optim_target_modules": ["a", "b"], "data_seed": 3}
    path = write(tmp_path, {**MINIMAL, "train": {"max_steps": 10, **extra}})
    cfg = load_recipe(path, ["train.logging_first_step=true"])
    assert cfg.train.learning_rate == 1.5  # spinlearn's defaults stay
    assert cfg.train.lr_scheduler_type == "cosine" and list(cfg.train.report_to) == ["wandb"]
    kwargs = training_arguments_kwargs(cfg)
    args = TrainingArguments(**kwargs)
    for key, value in {**extra, "logging_first_step": True}.items():
        got = getattr(args, key)
        assert (got.value if hasattr(got, "value") else got) == value, key
    # The resolved recipe (saved with a run) loads back to the same settings.
    again = load_recipe(write(tmp_path, OmegaConf.create(recipe_to_yaml(cfg)), "again.yaml"))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    # Passthrough keys do not loosen the schema: a typo after them is still refused.
    with pytest.raises(RecipeError, match="did you mean .train.eval_steps."):
        load_recipe(path, ["train.eval_stepz=3"])


def test_misspelt_passthrough_key_suggests_the_training_arguments_field(tmp_path: Path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL), ["train.max_grad_nrom=1.0"])
    msg = str(e.value)
    assert "unknown recipe key 'train.max_grad_nrom'" in msg and "did you mean 'train.max_grad_norm'" in msg
    assert "or any transformers.TrainingArguments field" in msg


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.adam_beta1=0.9", r"'train.adam_beta1' .* cannot be set here: .*rotation.optimizer"),
        ("train.output_dir=elsewhere", r"'train.output_dir' .* cannot be set here: set the top-level 'output_dir'"),
        ("train.remove_unused_columns=true", r"'train.remove_unused_columns' .* spinlearn sets it to false"),
        ("train.max_grad_norm=big", r"train.max_grad_norm: expected float \(transformers.TrainingArguments"
                                    r".max_grad_norm\), got 'big'"),
        ("train.eval_strategy=step", r"train.eval_strategy: expected 'no' \| 'steps' \| 'epoch'.*got 'step'"),
        ("train.logging_first_step=3", r"train.logging_first_step: expected bool"),
        ("train.label_names=[1,2]", r"train.label_names: expected list"),
    ],
)
def test_passthrough_errors_name_the_key(tmp_path: Path, override: str, pattern: str):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, MINIMAL), [override])


def test_spinlearn_train_keys_are_training_arguments_fields():
    fields = training_arguments_fields()
    assert {f for f in TrainConfig.__dataclass_fields__} <= set(fields)
    assert set(RESERVED_TRAIN_KEYS) <= set(fields)


def test_config_import_stays_torch_and_transformers_free():
    import subprocess
    import sys

    code = ("import sys; from spinlearn.config import load_recipe; "
            "load_recipe(None, ['model.path=m', 'data.train=a.txt', 'output_dir=o', 'train.max_steps=1']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("value, expected", [("latest", "latest"), ("true", True), ("false", False),
                                             ("null", None), ("runs/x/checkpoint-3", "runs/x/checkpoint-3")])
def test_resume_from_checkpoint_values(tmp_path: Path, value: str, expected):
    cfg = load_recipe(write(tmp_path, MINIMAL), [f"train.resume_from_checkpoint={value}"])
    assert cfg.train.resume_from_checkpoint == expected
    assert "resume_from_checkpoint" not in training_arguments_kwargs(cfg)
    with pytest.raises(RecipeError, match="train.resume_from_checkpoint: must be latest"):
        load_recipe(write(tmp_path, MINIMAL), ["train.resume_from_checkpoint=3"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["quant.learn_w_clip=true", "quant.w_bits=16"], r"quant\.learn_w_clip: needs quantized weights "
                                                         r"\(w_bits < 16\) in the int format"),
        (["quant.learn_w_clip=true", "quant.format=nvfp4"], r"quant\.learn_w_clip: needs quantized weights"),
        (["quant.learn_w_clip=true", "quant.w_clip=true"], r"quant\.learn_w_clip: learns the clip ratio that "
                                                           r"quant\.w_clip searches for"),
        (["quant.w_clip_lr=0"], r"quant\.w_clip_lr: must be > 0"),
        (["quant.learn_w_clip=true", "quant.w_clip_init=max"], r"quant\.w_clip_init: must be one of full \| mse"),
    ],
)
def test_learned_weight_clip_settings_are_checked(tmp_path: Path, overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, MINIMAL), overrides)
    assert load_recipe(write(tmp_path, MINIMAL), ["quant.learn_w_clip=true"]).quant.learn_w_clip is True
    assert load_recipe(write(tmp_path, MINIMAL), ["quant.learn_w_clip=true", "quant.w_clip_init=mse"]).quant.w_clip_init \
        == "mse"
    # Trained against round-to-nearest on the learned grid, deployed by GPTQ (with its own clip search).
    assert load_recipe(write(tmp_path, MINIMAL), ["quant.learn_w_clip=true", "quant.w_method=gptq"]).quant.learn_w_clip


def test_learned_kv_clip_needs_a_quantized_cache(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"quant\.learn_kv_clip: needs a quantized K/V cache \(kv_bits < 16\)"):
        load_recipe(write(tmp_path, MINIMAL), ["quant.learn_kv_clip=true", "quant.kv_bits=16"])
