"""RotationTrainer on a tiny Llama with planted outlier channels, where W4A4KV4 quantization really hurts.

The data are sequences sampled from the float model itself, so the float model is the best predictor of them and
the damage quantization does is measured exactly by KL(float || quantized) per token (the excess cross-entropy).
Rotations leave the float model unchanged; only the quantized model depends on them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import TrainingArguments

from spinlearn.data import TokenBlockDataset
from spinlearn.fusion import fold_rotations
from spinlearn.optim import CayleySGD, max_orthogonality_error
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.quant import QuantSpec, quantizers_disabled
from spinlearn.rotations import RotationBank
from helpers import tiny_model
from spinlearn.trainer import (
    NonFiniteLossError,
    RotationTrainer,
    _flatten_optimizer_state,
    _unflatten_optimizer_state,
    make_optimizer,
)
from spinlearn.fakequant import BANK_ATTR, rotations_attached, wrap_model
from spinlearn.quant import QuantSettings

OUTLIER_CHANNELS = [5, 17, 40]
OUTLIER_SCALE = 40.0
SEQLEN = 32
W4A4KV4 = QuantSettings(w=QuantSpec(bits=4), a=QuantSpec(bits=4, sym=False), kv=QuantSpec(bits=4, sym=False))
LAYOUT = "transformer_universal"


def outlier_model(seed: int = 0):
    """Tiny Llama (hidden 64, 2 layers, vocab 128) whose residual stream carries three huge channels: the
    embedding and every writer of the stream boost them, as in real LLMs. Per-token activation quantization
    of the stream's readers then loses the small channels unless a rotation spreads the outliers out."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, OUTLIER_CHANNELS] *= OUTLIER_SCALE  # tied: lm_head sees them too
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[OUTLIER_CHANNELS, :] *= OUTLIER_SCALE
            layer.mlp.down_proj.weight[OUTLIER_CHANNELS, :] *= OUTLIER_SCALE
    return model


@torch.no_grad()
def sample_tokens(model, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """n sequences drawn autoregressively from the model's own next-token distribution."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, 1), generator=gen)
    for _ in range(seqlen - 1):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids


def kl_per_token(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """mean over tokens of sum_v p_teacher (log p_teacher - log p_student), in float64."""
    s = torch.log_softmax(student_logits.double(), -1)
    t = teacher_logp.double()
    return (t.exp() * (t - s)).sum(-1).mean().item()


class Setup:
    """A prepared (untied, norm-fused) outlier model with its data; wrap/unwrap rotations on it per test."""

    def __init__(self, seed: int = 0, n_train: int = 256, n_eval: int = 32):
        self.original = outlier_model(seed)
        self.train_ids = sample_tokens(self.original, n_train, SEQLEN, seed=100)
        self.eval_ids = sample_tokens(self.original, n_eval, SEQLEN, seed=101)
        with torch.no_grad():
            self.eval_logp = torch.log_softmax(self.original(input_ids=self.eval_ids).logits.double(), -1)
        self.model = copy.deepcopy(self.original)
        self.plan = prepare_model(self.model, LAYOUT)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def hadamard(self, seed: int) -> dict[str, torch.Tensor]:
        return make_matrices(self.plan, mode="hadamard", seed=seed)

    def wrap(self, matrices: dict[str, torch.Tensor], quant: QuantSettings = W4A4KV4):
        self._attached = rotations_attached(self.model, self.plan, matrices, quant=quant)
        handle = self._attached.__enter__()
        return handle.bank, handle

    def unwrap(self, handle) -> None:
        self._attached.__exit__(None, None, None)

    @torch.no_grad()
    def eval_kl(self) -> float:
        return kl_per_token(self.model(input_ids=self.eval_ids).logits, self.eval_logp)

    def kl_of(self, matrices: dict[str, torch.Tensor]) -> float:
        _, handle = self.wrap(matrices)
        try:
            return self.eval_kl()
        finally:
            self.unwrap(handle)


def trainer_args(tmp_path, *, steps: int, lr: float = 1.5, batch: int = 16, **kw) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kw})


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """100 RotationTrainer steps at lr 1.5 (cosine), batch 16 x 32 tokens, from random Hadamard seed 0.

    Momentum 0, as in SpinQuant's SGDG: at this scale the straight-through gradients are noisy, and with
    momentum 0.9 the learned rotations landed no better than a random Hadamard in a sweep over model seeds."""
    init = setup.hadamard(0)
    bank, handle = setup.wrap(init)
    kl_init = setup.eval_kl()
    trainer = RotationTrainer(
        model=setup.model, args=trainer_args(tmp_path_factory.mktemp("trainer"), steps=100),
        train_dataset=TokenBlockDataset(setup.train_ids), bank=bank, momentum=0.0,
    )
    trainer.train()
    trainer.finalize_rotations()
    kl_learned = setup.eval_kl()
    learned = {k: v.double() for k, v in bank.matrices().items()}
    setup.unwrap(handle)
    return dict(init=init, learned=learned, kl_init=kl_init, kl_learned=kl_learned, bank=bank,
                log=trainer.state.log_history, steps=trainer.state.global_step)


# ------------------------------------------------------------------------------------------------ the trainer
def test_trainer_keeps_rotations_orthogonal_and_moves_them(trained):
    assert trained["steps"] == 100
    assert all(p.dtype == torch.float32 for p in trained["bank"].parameters())
    assert max_orthogonality_error(list(trained["bank"].parameters())) <= 1e-5  # float64 check of float32 params
    moved = max((trained["learned"][k] - trained["init"][k]).abs().max().item() for k in trained["init"])
    assert moved > 0.05  # it really trained (a no-op would pass the orthogonality check trivially)


def test_trainer_logs_rotation_fields(trained):
    steps = [e for e in trained["log"] if "loss" in e]
    assert [e["step"] for e in steps] == list(range(10, 101, 10))
    for e in steps:
        assert e["max_orth_error"] <= 1e-5
        assert e["rot_grad_norm"] > 0 and math.isfinite(e["rot_grad_norm"])
        assert 0 < e["rot_tangent_grad_norm"] <= e["rot_grad_norm"] * (1 + 1e-6)  # a projection's norm
        assert e["tokens_per_s"] > 0


def test_quantized_loss_falls_on_planted_outliers(setup, trained):
    # The planting works: without rotations W4A4KV4 is far off, a random Hadamard helps.
    ident = {k: torch.eye(v.shape[0], dtype=torch.float64) for k, v in trained["init"].items()}
    kl_none = setup.kl_of(ident)
    assert kl_none > 2 * trained["kl_init"] > 0
    assert trained["kl_learned"] < 0.8 * trained["kl_init"], (trained["kl_init"], trained["kl_learned"])


def test_learned_beats_mean_of_5_random_hadamard_seeds(setup, trained):
    kls = [setup.kl_of(setup.hadamard(s)) for s in range(5)]
    mean = sum(kls) / len(kls)
    assert trained["kl_learned"] < 0.8 * mean, (trained["kl_learned"], kls)


# The best-of-10-seeds claim is checked on the demo model (tests/test_demo_run.py, slow): at hidden size 64
# the learned rotation lands among the best random Hadamards but not reliably below all ten.


def test_fused_float_logits_equal_wrapped_float_logits(setup, trained):
    """Folding the learned matrices into the weights gives the wrapped model with quantizers off, and both equal
    the original float model (rotations are invariances of the float model)."""
    model = copy.deepcopy(setup.original)
    plan = prepare_model(model, LAYOUT)
    ids = setup.eval_ids[:4]
    with torch.no_grad():
        with rotations_attached(model, plan, trained["learned"], quant=W4A4KV4) as handle:
            assert all(not p.requires_grad for n, p in model.named_parameters() if BANK_ATTR not in n)
            quantized = model(input_ids=ids).logits
            with quantizers_disabled(model):
                wrapped = model(input_ids=ids).logits
            bank = handle.bank
        assert not hasattr(model, BANK_ATTR)  # detached: the plain prepared model again
        fold_rotations(plan.placements, {k: v.double() for k, v in bank.matrices().items()}, True)
        fused = model(input_ids=ids).logits
        original = setup.original(input_ids=ids).logits

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(fused, wrapped) <= 1e-4
    assert rel(wrapped, original) <= 1e-4
    assert rel(quantized, wrapped) > 1e-2  # the quantizers were on before, so "off" was really off


# --------------------------------------------------------------------------------------- orthogonality, 100 steps
@pytest.mark.parametrize("name,momentum", [("cayley_sgd", 0.9), ("riemannian_sgd", 0.9), ("riemannian_adam", 0.0)])
def test_optimizers_stay_orthogonal_100_steps_at_lr_1_5(setup, name, momentum):
    """A direct loop over the wrapped model (the trainer's optimizer, without the Trainer's overhead)."""
    bank, handle = setup.wrap(setup.hadamard(1))
    try:
        opt = make_optimizer(name, list(bank.parameters()), lr=1.5, momentum=momentum)
        gen = torch.Generator().manual_seed(0)
        start = {k: v.clone() for k, v in bank.matrices().items()}
        for _ in range(100):
            batch = setup.train_ids[torch.randint(0, len(setup.train_ids), (4,), generator=gen)]
            loss = setup.model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert math.isfinite(loss.item())
        assert max_orthogonality_error(list(bank.parameters())) <= 1e-5
        moved = max((bank.matrices()[k] - start[k]).abs().max().item() for k in start)
        assert moved > 1e-2
    finally:
        setup.unwrap(handle)


# ------------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("ce_weight, kl_weight", [(0.4, 0.7), (0.0, 1.0)])
def test_compute_loss_is_ce_plus_kl_to_the_float_model(setup, tmp_path, ce_weight, kl_weight):
    """loss = ce_weight * CE(quantized) + kl_weight * KL(float || quantized), the float teacher being the same
    wrapped model with every wrapper passed through (fakequant.float_passthrough); checked against the original,
    never-rotated model in float64. With ce_weight 0 (distillation alone, the demo recipe's loss) the loss is the KL
    term alone."""
    bank, handle = setup.wrap(setup.hadamard(2))
    try:
        trainer = RotationTrainer(
            model=setup.model, args=trainer_args(tmp_path, steps=1), train_dataset=TokenBlockDataset(setup.train_ids),
            bank=bank, kl_weight=kl_weight, ce_weight=ce_weight,
        )
        ids = setup.train_ids[:3]
        loss = trainer.compute_loss(setup.model, {"input_ids": ids, "labels": ids})
        with torch.no_grad():
            student = setup.model(input_ids=ids).logits.double()
            teacher_logp = torch.log_softmax(setup.original(input_ids=ids).logits.double(), -1)
        logp = torch.log_softmax(student, -1)
        ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()  # next-token CE, HF's shift
        kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
        assert kl > 1e-3  # quantization changes the distribution: the KL term is not trivially 0
        assert loss.item() == pytest.approx((ce_weight * ce + kl_weight * kl).item(), rel=1e-4)
        assert trainer.tokens_seen == ids.numel()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.parameters())
    finally:
        setup.unwrap(handle)


def test_no_loss_term_is_refused(setup, tmp_path):
    bank, handle = setup.wrap(setup.hadamard(0))
    try:
        trainer = RotationTrainer(
            model=setup.model, args=trainer_args(tmp_path, steps=1), train_dataset=TokenBlockDataset(setup.train_ids),
            bank=bank, kl_weight=0.0, ce_weight=0.0,
        )
        ids = setup.train_ids[:1]
        with pytest.raises(ValueError, match="loss.ce_weight and loss.kl_weight are both 0"):
            trainer.compute_loss(setup.model, {"input_ids": ids, "labels": ids})
    finally:
        setup.unwrap(handle)


def test_nonfinite_loss_raises_with_the_step(setup, tmp_path):
    bank, handle = setup.wrap(setup.hadamard(0))
    try:
        trainer = RotationTrainer(
            model=setup.model, args=trainer_args(tmp_path, steps=5), train_dataset=TokenBlockDataset(setup.train_ids),
            bank=bank,
        )
        trainer.state.global_step = 6
        with torch.no_grad():
            bank.get("r1")[0, 0] = float("nan")
        ids = setup.train_ids[:1]
        with pytest.raises(NonFiniteLossError, match="nan at step 7") as info:
            trainer.compute_loss(setup.model, {"input_ids": ids, "labels": ids})
        assert info.value.step == 7
    finally:
        setup.unwrap(handle)


def test_trainer_refuses_unset_max_steps(setup, tmp_path):
    bank = RotationBank(setup.hadamard(0))
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        RotationTrainer(model=setup.model, args=trainer_args(tmp_path, steps=-1, num_train_epochs=1),
                        train_dataset=TokenBlockDataset(setup.train_ids), bank=bank)


# ------------------------------------------------------------------------------------------ optimizer pieces
def test_make_optimizer_names():
    p = torch.nn.Parameter(torch.eye(4))
    assert isinstance(make_optimizer("cayley_sgd", [p], 1.5, 0.9), CayleySGD)
    assert make_optimizer("cayley_sgd", [p], 1.5, 0.9).defaults["reorth_every"] == 1
    with pytest.raises(ValueError, match="cayley_sgd, riemannian_sgd or riemannian_adam"):
        make_optimizer("adamw", [p], 1e-3, 0.9)


def test_optimizer_state_flattens_to_safetensors_and_back():
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    params = [torch.nn.Parameter(q1), torch.nn.Parameter(q2)]
    opt = CayleySGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params).backward()
        opt.step()
    sd = opt.state_dict()
    tensors, meta = _flatten_optimizer_state(sd)
    assert {"state.0.momentum_buffer", "state.1.momentum_buffer"} <= set(tensors)
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata must be strings
    back = _unflatten_optimizer_state(tensors, meta)
    assert back["param_groups"] == sd["param_groups"]
    for idx, st in sd["state"].items():
        assert set(back["state"][idx]) == set(st)
        torch.testing.assert_close(back["state"][idx]["momentum_buffer"], st["momentum_buffer"], rtol=0, atol=0)
        assert back["state"][idx]["step"] == st["step"]


# ------------------------------------------------------------------------ checkpoints of a mean-preserving bank
def test_checkpoint_of_a_mean_preserving_bank_resumes_bit_exactly(tmp_path):
    """OPT (LayerNorm): the optimizer moves Q of R1 = H diag(1, Q) H; the checkpoint holds the full R1 (which maps 1
    to 1) for users and Q itself for a bit-exact resume; without Q it is recovered from R1 (to rounding)."""
    import os

    from safetensors.torch import load_file

    from spinlearn.artifacts import ROTATION_PARAMS_FILE, ROTATIONS_FILE
    from spinlearn.rotations import ones_residual

    model = tiny_model("opt")
    plan = prepare_model(model, "opt")
    bank = RotationBank.for_plan(plan, make_matrices(plan, mode="hadamard", seed=0))
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, BANK_ATTR, bank)
    wrap_model(model, plan=plan, bank=bank, quant=W4A4KV4)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer = RotationTrainer(model=model, args=trainer_args(tmp_path, steps=1, batch=2),
                              train_dataset=TokenBlockDataset(ids), bank=bank)
    opt = trainer.create_optimizer()
    assert [tuple(p.shape) for g in opt.param_groups for p in g["params"]][0] == (63, 63)  # Q, not R1
    trainer.compute_loss(model, {"input_ids": ids, "labels": ids}).backward()
    opt.step()
    trainer.finalize_rotations()  # polar step on Q: R1 stays mean-preserving and orthogonal
    assert ones_residual(bank.get("r1").detach().double()) <= 1e-5 and bank.max_orthogonality_error() <= 1e-5
    ckpt = tmp_path / "checkpoint-1"
    trainer._save(str(ckpt))
    saved = load_file(ckpt / ROTATIONS_FILE)
    assert saved["r1"].shape == (64, 64) and ones_residual(saved["r1"].double()) <= 1e-5
    before = bank.parameter_tensors()
    for resume_exact in (True, False):
        if not resume_exact:
            os.remove(ckpt / ROTATION_PARAMS_FILE)
        with torch.no_grad():
            for p in bank.parameters():
                p.copy_(torch.eye(p.shape[0]))
        trainer._load_from_checkpoint(str(ckpt))
        for n, t in bank.parameter_tensors().items():
            if resume_exact:
                assert torch.equal(t, before[n]), n
            else:
                torch.testing.assert_close(t, before[n], rtol=0, atol=1e-5)


# ------------------------------------------------------------------- learned scales and clips beside the rotations
def _train_with_scales_and_clips(out, resume=None, seed: int = 0):
    from spinlearn.fakequant import activation_clip_params, weight_clip_params
    from spinlearn.scales import ScaleBank, plan_scales

    model = tiny_model("llama")
    plan = prepare_model(model, LAYOUT)
    pairs = plan_scales(model, plan, log=False)
    gen = torch.Generator().manual_seed(seed)
    scales = ScaleBank(pairs, {p.key: torch.rand(p.width, generator=gen) + 0.5 for p in pairs} if seed else None)
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    start = make_matrices(plan, mode="hadamard", seed=seed)
    with rotations_attached(model, plan, start, quant=W4A4KV4, scales=scales, learn_a_clip=True,
                            learn_w_clip=True) as handle:
        clips, w_clips = activation_clip_params(model), weight_clip_params(model)
        if seed:  # another start for the weight clips too
            with torch.no_grad():
                for p in w_clips.values():
                    p.uniform_(0.0, 3.0, generator=gen)
        trainer = RotationTrainer(
            model=model, args=trainer_args(out, steps=4, batch=2, save_strategy="steps", save_steps=2, logging_steps=1),
            train_dataset=TokenBlockDataset(ids), bank=handle.bank, momentum=0.9, scales=scales, scales_lr=0.05,
            clips=clips, clips_lr=0.05, weight_clips=w_clips, weight_clips_lr=0.05)
        trainer.train(resume_from_checkpoint=resume)
        return (handle.bank.parameter_tensors(), scales.log_scales(),
                {n: p.detach().clone() for n, p in {**clips, **w_clips}.items()}, trainer)


def test_scales_and_clips_learn_with_adam_and_resume_bit_exactly(tmp_path):
    from spinlearn.optim import MultiOptimizer

    rot, log_s, clips, trainer = _train_with_scales_and_clips(tmp_path / "a")
    opt = trainer.optimizer.optimizer  # accelerate's wrapper holds ours
    assert isinstance(opt, MultiOptimizer) and [type(o).__name__ for o in opt.optimizers] == ["CayleySGD", "Adam"]
    assert [g["lr"] for g in opt.param_groups][1:] == [0.0, 0.0, 0.0]  # the cosine schedule reached every group
    assert min(v.abs().max().item() for v in log_s.values()) > 1e-3  # every scale moved away from 1
    start_logit = math.log(0.99 / 0.01)
    assert len(clips) == 2 * 2 * 7  # activations and weights
    assert all((v - start_logit).abs().max().item() > 1e-3 for v in clips.values())
    assert "scale_max" in trainer.state.log_history[0]
    # the optimizer state round-trips through the safetensors flattening
    sd = opt.state_dict()
    back = _unflatten_optimizer_state(*_flatten_optimizer_state(sd))
    assert back["param_groups"] == json_roundtrip(sd["param_groups"])
    # resumed from another start: only what the checkpoint holds (matrices, scales, clips, both optimizers' state)
    # can make it end bit-identical to the uninterrupted run
    rot2, log_s2, clips2, _ = _train_with_scales_and_clips(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"),
                                                           seed=1)
    for a, b in ((rot, rot2), (log_s, log_s2), (clips, clips2)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


def test_multi_optimizer_groups_are_the_inner_ones_and_its_state_continues_bit_exactly():
    from spinlearn.optim import MultiOptimizer

    gen = torch.Generator().manual_seed(0)
    q0, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    s0 = torch.randn(5, generator=gen)
    grads = [(torch.randn(6, 6, generator=gen), torch.randn(5, generator=gen)) for _ in range(4)]

    def make():
        q, s = torch.nn.Parameter(q0.clone()), torch.nn.Parameter(s0.clone())
        return q, s, MultiOptimizer([CayleySGD([q], lr=0.1, momentum=0.9), torch.optim.Adam([s], lr=0.05)])

    def step(q, s, opt, k):
        opt.zero_grad()
        ((q * grads[k][0]).sum() + (s * grads[k][1]).sum()).backward()
        opt.step()

    q1, s1, o1 = make()
    for k in range(2):
        step(q1, s1, o1, k)
    tensors, meta = _flatten_optimizer_state(o1.state_dict())
    saved = _unflatten_optimizer_state({k: v.clone() for k, v in tensors.items()}, meta)  # as if read from a file
    q2, s2, o2 = make()
    with torch.no_grad():
        q2.copy_(q1), s2.copy_(s1)
    o2.load_state_dict(saved)
    assert o2.param_groups[1] is o2.optimizers[1].param_groups[0]  # a scheduler setting lr reaches Adam
    for k in (2, 3):
        step(q1, s1, o1, k)
        step(q2, s2, o2, k)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    o2.param_groups[1]["lr"] = 0.0
    before = s2.detach().clone()
    step(q2, s2, o2, 0)
    assert torch.equal(s2, before) and not torch.equal(q2, q1)
