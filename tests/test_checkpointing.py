"""Gradient (activation) checkpointing with the rotated weights (issue 9, item 3).

Each rotated weight is a parametrization computing quant(R_out^T W R_in) from the live bank when the module reads
it. Under non-reentrant checkpointing the decoder layers' forward is run again in the backward pass, so those
weights must be recomputed there (not kept from the forward: that is where the memory goes) and the rotations
must get exactly the gradients they get without checkpointing.
"""

from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf
from transformers import TrainingArguments

from helpers import tiny_model
from spinlearn.config import RecipeConfig, training_arguments_kwargs
from spinlearn.data import TokenBlockDataset
from spinlearn.fakequant import RotateQuantWeight, rotations_attached
from spinlearn.quant import QuantSettings, QuantSpec
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.trainer import RotationTrainer

W4A4KV4 = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4, sym=False), kv=QuantSpec(bits=4, sym=False))
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down: the parametrized weights inside one decoder layer


@contextlib.contextmanager
def counted_weight_computations():
    """Counts every evaluation of a rotated weight (RotateQuantWeight.forward) while the block runs."""
    calls = {"n": 0}
    original = RotateQuantWeight.forward

    def counting(self, w):
        calls["n"] += 1
        return original(self, w)

    RotateQuantWeight.forward = counting
    try:
        yield calls
    finally:
        RotateQuantWeight.forward = original


def rotated_tiny_llama(dtype: torch.dtype):
    model = tiny_model("llama", dtype=dtype)
    plan = prepare_model(model, "transformer_universal")
    return model, plan, make_matrices(plan, mode="hadamard", seed=0)


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (the name changed in transformers 5.23)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rotation_grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    """Rotation gradients of one W4A4KV4 forward/backward (float64, R3 on), and how many rotated weights were
    computed in the forward and in the backward pass."""
    model, plan, matrices = rotated_tiny_llama(torch.float64)
    with rotations_attached(model, plan, matrices, quant=W4A4KV4, r3=True) as handle, \
            counted_weight_computations() as calls:
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
        in_forward = calls["n"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in handle.bank.named_parameters()}
    return grads, in_forward, calls["n"] - in_forward


def test_checkpointing_recomputes_the_rotated_weights_and_gives_the_same_rotation_gradients():
    plain, fwd_plain, bwd_plain = rotation_grads(checkpointing=False)
    ckpt, fwd_ckpt, bwd_ckpt = rotation_grads(checkpointing=True)
    layers = tiny_model("llama").config.num_hidden_layers
    assert fwd_plain == fwd_ckpt == layers * LINEARS_PER_LAYER + 2  # + embed_tokens and the untied lm_head
    assert bwd_plain == 0  # without checkpointing the backward reuses the forward's rotated weights
    assert bwd_ckpt == layers * LINEARS_PER_LAYER  # every decoder layer's weights again; embed/lm_head are outside
    assert set(plain) == set(ckpt) and len(plain) == 1 + layers  # R1 and one R2 per layer
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-12)


def _recipe_training_args(out, checkpointing: bool) -> TrainingArguments:
    """TrainingArguments as the job builds them from a recipe's ``train`` section."""
    cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), {
        "model": {"path": "unused"}, "data": {"train": "unused"}, "output_dir": str(out),
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 100, "report_to": ["none"],
                  "gradient_checkpointing": checkpointing},
    })
    return TrainingArguments(**training_arguments_kwargs(cfg))


def trained_matrices(tmp_path, checkpointing: bool) -> tuple[dict[str, torch.Tensor], bool, int]:
    """Two RotationTrainer steps (float32) with ``train.gradient_checkpointing`` as given: the matrices, whether
    the decoder layers had checkpointing on, and how many rotated weights were computed in all."""
    model, plan, matrices = rotated_tiny_llama(torch.float32)
    blocks = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    with rotations_attached(model, plan, matrices, quant=W4A4KV4, r3=True) as handle, \
            counted_weight_computations() as calls:
        trainer = RotationTrainer(model=model, args=_recipe_training_args(tmp_path / str(checkpointing), checkpointing),
                                  train_dataset=TokenBlockDataset(blocks), bank=handle.bank)
        trainer.train()
        on = all(layer.gradient_checkpointing for layer in model.model.layers)
        learned = {k: v.detach().clone() for k, v in handle.bank.matrices().items()}
    return learned, on, calls["n"]


def test_recipe_key_turns_checkpointing_on_in_the_trainer_with_the_same_result(tmp_path):
    plain, on_plain, n_plain = trained_matrices(tmp_path, checkpointing=False)
    ckpt, on_ckpt, n_ckpt = trained_matrices(tmp_path, checkpointing=True)
    assert not on_plain and on_ckpt
    assert n_ckpt - n_plain == 2 * 2 * LINEARS_PER_LAYER  # 2 steps x 2 layers recomputed in the backward
    start = rotated_tiny_llama(torch.float32)[2]
    assert max((plain[k].double() - start[k]).abs().max().item() for k in start) > 1e-3  # training moved them
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6)
