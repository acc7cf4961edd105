"""CUDA / bf16 paths. Skipped without a GPU (CI has none); run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

import spinlearn
from spinlearn.hadamard import fast_hadamard_transform, hadamard_matrix
from spinlearn.rotation_plan import make_matrices, prepare_model
from spinlearn.quant import quantizers_disabled
from helpers import layout_for, logits_in_model_dtype, tiny_model
from spinlearn.trainer import make_optimizer
from spinlearn.fakequant import rotations_attached
from spinlearn.online import online_linears
from spinlearn.quant import QuantSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "opt", "nemotron_h"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_rotate_on_cuda(family, dtype, tol):
    model = tiny_model(family).to("cuda", dtype)
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    ref = logits_in_model_dtype(model, ids)
    spinlearn.rotate(model, layout_for(family))
    assert _rel(logits_in_model_dtype(model, ids), ref) <= tol


@pytest.mark.parametrize("n", [128, 4096, 11008, 14336])
def test_fast_hadamard_on_cuda_matches_dense(n):
    x = torch.randn(64, n, device="cuda", dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64, device="cuda")
    assert (fast_hadamard_transform(x) - x @ h).abs().max().item() <= 1e-10
    xb = x.to(torch.bfloat16)
    assert _rel(fast_hadamard_transform(xb), x @ h) <= 2e-2


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_wrapped_training_steps_on_cuda(model_dtype):
    model = tiny_model("llama").to("cuda", model_dtype)
    ids = torch.randint(3, 128, (2, 32), device="cuda")
    ref = logits_in_model_dtype(model, ids)
    plan = prepare_model(model, layout_for("llama"))
    q = QuantSettings.from_flags(w_bits=4, a_bits=4, kv_bits=4)
    attached = rotations_attached(model, plan, make_matrices(plan, seed=0), quant=q, r3=True,
                                  online=online_linears(model, r4=True))
    bank = attached.__enter__().bank  # rotations stay float32, on the model's device
    opt = make_optimizer("cayley_sgd", list(bank.parameters()), lr=1.5, momentum=0.9)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert bank.max_orthogonality_error() <= 1e-5
    with quantizers_disabled(model), torch.no_grad():
        float_logits = model(input_ids=ids).logits
    tol = 1e-3 if model_dtype == torch.float32 else 8e-2
    assert _rel(float_logits, ref) <= tol  # rotations (and R3/R4) keep the float model's function


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rotations_on_the_activations_on_cuda(dtype, tol):
    """rotation.apply activations on CUDA: the weight-side loss (bf16: within its rounding)."""
    from helpers import loss_on_both_sides

    weights, activations = loss_on_both_sides("llama", "cuda", dtype)
    assert abs(activations - weights) <= tol * abs(weights)


@pytest.mark.parametrize("mode", ["random", "hadamard"])
def test_folding_a_cpu_model_on_the_gpu_equals_folding_it_on_the_cpu(mode):
    """FSDP's rank 0 keeps the model in CPU memory and folds on its GPU (fold_rotations(device=...)): the weights
    stay on the CPU and equal a CPU fold to float64 rounding."""
    from spinlearn.fusion import fold_rotations

    on_cpu, on_gpu = tiny_model("llama", dtype=torch.float64), tiny_model("llama", dtype=torch.float64)
    plans = [prepare_model(m, "transformer_universal") for m in (on_cpu, on_gpu)]
    matrices = make_matrices(plans[0], mode=mode, seed=0)
    fold_rotations(plans[0].placements, matrices, True)
    fold_rotations(plans[1].placements, matrices, True, device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        assert (a - b).abs().max().item() <= 1e-12, name


def test_the_wrappers_follow_each_layers_device_in_a_device_map():
    """model.device_map: accelerate dispatches the embeddings and the first decoder layer to the CPU, the rest to
    the GPU (the CPU as main device: both execute where they sit); the rotation and scale banks sit with the first
    weight. W4A4KV4 with R3/R4, learned scales and clips: the loss and the learned tensors' gradients equal the same
    model's on the CPU alone, and the fold writes every weight on its own device."""
    import copy

    from accelerate import dispatch_model

    from spinlearn.fusion import fold_rotations
    from spinlearn.scales import ScaleBank, plan_scales

    whole = tiny_model("llama")
    mapped = dispatch_model(copy.deepcopy(whole), main_device="cpu", device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": 0,
        "model.norm": 0, "lm_head": 0})
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    q = QuantSettings.from_flags(w_bits=4, a_bits=4, kv_bits=4)

    def loss_and_grads(model):
        plan = prepare_model(model, layout_for("llama"))
        pairs = plan_scales(model, plan, log=False)
        init = {p.key: 0.5 + torch.rand(p.width, generator=torch.Generator().manual_seed(1)) for p in pairs}
        with rotations_attached(model, plan, make_matrices(plan, seed=0), quant=q, r3=True,
                                online=online_linears(model, r4=True), scales=ScaleBank(pairs, init),
                                learn_a_clip=True, learn_w_clip=True) as h:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            learned = [*h.bank.named_parameters(), *h.scales.named_parameters()]
            grads = {n: p.grad.detach().cpu().double() for n, p in learned}
        return plan, loss.item(), grads

    _, ref_loss, ref_grads = loss_and_grads(whole)
    plan, loss, grads = loss_and_grads(mapped)
    assert {p.device.type for p in mapped.parameters()} == {"cpu", "cuda"}
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    flat, ref_flat = (torch.cat([g[n].flatten() for n in ref_grads]) for g in (grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0).item() >= 0.999  # CPU vs GPU roundings
    devices = {n: p.device for n, p in mapped.named_parameters()}
    fold_rotations(plan.placements, make_matrices(plan, seed=0), True)
    assert {n: p.device for n, p in mapped.named_parameters()} == devices
