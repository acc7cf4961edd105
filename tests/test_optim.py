import copy
import io
import math

import pytest
import torch

from spinlearn.optim import CayleySGD, max_orthogonality_error, polar_orthonormalize, tangent_part


def random_orthogonal(n: int, p: int | None = None, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, p or n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def procrustes_problem(n: int, *, seed: int = 0, dtype=torch.float32):
    """min_R ||A R - B||_F^2 / n over orthogonal R; A well conditioned, B = A R_true + noise.

    Returns A, B, the SVD solution R_opt (float64) and a start R0 on the same connected component
    (same determinant) as R_opt, since a continuous rotation cannot flip the determinant.
    """
    g = torch.Generator().manual_seed(seed)
    u = random_orthogonal(n, seed=seed + 1, dtype=torch.float64)
    v = random_orthogonal(n, seed=seed + 2, dtype=torch.float64)
    a = u @ torch.diag(torch.linspace(1.0, 2.0, n, dtype=torch.float64)) @ v
    b = a @ random_orthogonal(n, seed=seed + 3, dtype=torch.float64)
    b = b + 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64)
    uu, _, vh = torch.linalg.svd(a.T @ b)
    r_opt = uu @ vh
    r0 = random_orthogonal(n, seed=seed + 4, dtype=torch.float64)
    if torch.linalg.det(r0) * torch.linalg.det(r_opt) < 0:
        r0[:, 0] = -r0[:, 0]
    return a.to(dtype), b.to(dtype), r_opt, r0.to(dtype)


def procrustes_loss(a, b, r):
    return ((a @ r - b) ** 2).sum() / a.shape[0]


def run_procrustes(opt_kwargs: dict, *, n: int = 32, steps: int = 100, dtype=torch.float32, seed: int = 0):
    a, b, r_opt, r0 = procrustes_problem(n, seed=seed, dtype=dtype)
    r = torch.nn.Parameter(r0.clone())
    opt = CayleySGD([r], **opt_kwargs)
    errors, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = procrustes_loss(a, b, r)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        errors.append(max_orthogonality_error([r]))
    return r, opt, losses, errors


def reference_step(x, g, m, *, lr, beta, q, iters, eps=1e-8):
    """Algorithm 2 of Li et al. (2020) written out in float64, one statement per line of the paper."""
    x, g, m = x.double(), g.double(), m.double()
    m = beta * m - g
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    m = w @ x
    alpha = min(lr, 2 * q / (torch.linalg.norm(w).item() + eps))
    y = x + alpha * m
    for _ in range(iters):
        y = x + alpha / 2 * w @ (x + y)
    return y, m, w, alpha


@pytest.mark.parametrize("shape", [(16, 16), (24, 8)])
def test_steps_match_reference_algorithm_and_momentum_is_written_back(shape):
    n, p = shape
    x0 = random_orthogonal(n, p, seed=1, dtype=torch.float64)
    param = torch.nn.Parameter(x0.clone())
    opt = CayleySGD([param], lr=0.7, momentum=0.8, q=0.5, fixed_point_iters=3)
    x_ref, m_ref = x0.clone(), torch.zeros_like(x0)
    previous_buffer = None
    for step in range(4):
        grad = torch.randn(n, p, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
        param.grad = grad.clone()
        opt.step()
        x_ref, m_ref, _, _ = reference_step(x_ref, grad, m_ref, lr=0.7, beta=0.8, q=0.5, iters=3)
        buffer = opt.state[param]["momentum_buffer"]
        torch.testing.assert_close(param.detach(), x_ref, rtol=0, atol=1e-12)
        # The buffer holds the *projected* momentum W X, not beta*M - G.
        torch.testing.assert_close(buffer, m_ref, rtol=0, atol=1e-12)
        if previous_buffer is not None:
            assert not torch.allclose(buffer, previous_buffer)
        previous_buffer = buffer.clone()
    assert opt.state[param]["step"] == 4


def test_projected_momentum_is_skew_part_for_square_rotations():
    # For square X (X X^T = I) the projection reduces to W X = (M - X M^T X) / 2.
    x = random_orthogonal(12, seed=3, dtype=torch.float64)
    grad = torch.randn(12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    param = torch.nn.Parameter(x.clone())
    param.grad = grad
    opt = CayleySGD([param], lr=1e-3, momentum=0.9)
    opt.step()
    m = -grad
    expected = 0.5 * (m - x @ m.T @ x)
    torch.testing.assert_close(opt.state[param]["momentum_buffer"], expected, rtol=0, atol=1e-13)


def test_many_fixed_point_iterations_give_the_exact_cayley_transform():
    n = 16
    x = random_orthogonal(n, seed=5, dtype=torch.float64)
    grad = torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    param = torch.nn.Parameter(x.clone())
    param.grad = grad
    opt = CayleySGD([param], lr=10.0, momentum=0.0, fixed_point_iters=80)
    opt.step()
    _, _, w, alpha = reference_step(x, grad, torch.zeros_like(x), lr=10.0, beta=0.0, q=0.5, iters=0)
    eye = torch.eye(n, dtype=torch.float64)
    cayley = torch.linalg.solve(eye - alpha / 2 * w, (eye + alpha / 2 * w) @ x)
    assert alpha == pytest.approx(1.0 / torch.linalg.norm(w).item(), rel=1e-6)  # the step cap was active
    torch.testing.assert_close(param.detach(), cayley, rtol=0, atol=1e-12)
    assert max_orthogonality_error([param]) < 1e-12


def test_small_step_decreases_loss_as_first_order_theory_predicts():
    a, b, _, r0 = procrustes_problem(16, seed=7, dtype=torch.float64)
    r = torch.nn.Parameter(r0.clone())
    loss0 = procrustes_loss(a, b, r)
    loss0.backward()
    grad = r.grad.clone()
    lr = 1e-4
    opt = CayleySGD([r], lr=lr, momentum=0.0)
    opt.step()
    loss1 = procrustes_loss(a, b, r.detach()).item()
    # Predicted change: <G, dX> with dX = lr * W X = -lr * (G - X G^T X) / 2 for square X.
    predicted = -lr * 0.5 * (grad * (grad - r0 @ grad.T @ r0)).sum().item()
    assert predicted < 0
    assert loss1 < loss0.item()
    assert loss1 - loss0.item() == pytest.approx(predicted, rel=1e-3)


def test_fixed_point_drift_is_bounded_and_orthonormalize_removes_it():
    # The paper's 2 iterations are only approximately orthogonal at the capped step size; the drift
    # is real (it is what reorth_every / orthonormalize_ are for), but stays moderate.
    r, opt, _, errors = run_procrustes(dict(lr=1.5))
    assert 1e-6 < errors[-1] < 0.1
    before = r.detach().double().clone()
    opt.orthonormalize_()
    assert max_orthogonality_error([r]) < 1e-5
    u, _, vh = torch.linalg.svd(before)
    torch.testing.assert_close(r.detach().double(), u @ vh, rtol=0, atol=1e-5)  # the polar factor


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1.5, reorth_every=1), dict(lr=1.5, fixed_point_iters=16)],
    ids=["reorth_every_step", "converged_fixed_point"],
)
def test_stays_on_manifold_float32(kwargs):
    _, _, losses, errors = run_procrustes(kwargs, n=32, steps=100)
    assert max(errors) <= 1e-5
    assert losses[-1] < 0.2 * losses[0]


def test_reorth_every_k_fires_on_multiples_of_k():
    _, _, _, errors = run_procrustes(dict(lr=1.5, reorth_every=5), steps=20)
    for step, err in enumerate(errors, start=1):
        if step % 5 == 0:
            assert err <= 1e-6
    assert max(errors) > 1e-5  # in between, the drift from the fixed-point iteration shows


def test_procrustes_converges_to_svd_solution_with_cosine_schedule():
    n, steps = 32, 150
    a, b, r_opt, r0 = procrustes_problem(n, seed=11)
    r = torch.nn.Parameter(r0.clone())
    opt = CayleySGD([r], lr=1.5, reorth_every=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    for _ in range(steps):
        opt.zero_grad()
        procrustes_loss(a, b, r).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    opt.orthonormalize_()
    r64 = r.detach().double()
    loss_start = procrustes_loss(a.double(), b.double(), r0.double()).item()
    loss_end = procrustes_loss(a.double(), b.double(), r64).item()
    loss_opt = procrustes_loss(a.double(), b.double(), r_opt).item()
    assert loss_end - loss_opt < 1e-3 * (loss_start - loss_opt)
    assert (r64 - r_opt).abs().max().item() < 0.03


def test_lr_is_read_from_param_groups_each_step():
    x = random_orthogonal(16, seed=12)
    grad = 1e-3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(13))
    results = []
    for mutate in (False, True):
        param = torch.nn.Parameter(x.clone())
        param.grad = grad.clone()
        opt = CayleySGD([param], lr=0.01 if not mutate else 1.0)
        if mutate:
            opt.param_groups[0]["lr"] = 0.01  # what a scheduler does
        opt.step()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], x)


def _train(opt_kwargs, steps, *, start=None, seed=0):
    """Run `steps` steps of a cosine-scheduled Procrustes fit; optionally resume from a checkpoint."""
    a, b, _, r0 = procrustes_problem(24, seed=seed)
    r = torch.nn.Parameter(r0.clone() if start is None else start["param"].clone())
    opt = CayleySGD([r], **opt_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / 10)))
    if start is not None:
        opt.load_state_dict(start["opt"])
        sched.load_state_dict(start["sched"])
    for _ in range(steps):
        opt.zero_grad()
        procrustes_loss(a, b, r).backward()
        opt.step()
        sched.step()
    return r, opt, sched


def test_resume_from_state_dict_is_bit_identical():
    kwargs = dict(lr=1.5, momentum=0.9, reorth_every=3)
    r_full, opt_full, _ = _train(kwargs, 10)

    r_half, opt_half, sched_half = _train(kwargs, 5)
    buf = io.BytesIO()
    ckpt = {"param": r_half.detach(), "opt": opt_half.state_dict(), "sched": sched_half.state_dict()}
    torch.save(ckpt, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    r_resumed, opt_resumed, _ = _train(kwargs, 5, start=ckpt)

    assert torch.equal(r_full.detach(), r_resumed.detach())
    state_full = opt_full.state[r_full]
    state_resumed = opt_resumed.state[r_resumed]
    assert state_full["step"] == state_resumed["step"] == 10
    assert torch.equal(state_full["momentum_buffer"], state_resumed["momentum_buffer"])


def test_state_dict_taken_earlier_is_not_changed_by_later_steps():
    r, opt, _ = _train(dict(lr=1.5), 3)
    snapshot = copy.deepcopy(opt.state_dict())
    held = opt.state_dict()["state"][0]["momentum_buffer"]  # a reference, as a checkpoint writer holds it
    a, b, _, _ = procrustes_problem(24)
    opt.zero_grad()
    procrustes_loss(a, b, r).backward()
    opt.step()
    assert torch.equal(held, snapshot["state"][0]["momentum_buffer"])
    assert not torch.equal(opt.state[r]["momentum_buffer"], held)


def test_two_runs_are_identical():
    r1, opt1, losses1, _ = run_procrustes(dict(lr=1.5, reorth_every=4), steps=30)
    r2, opt2, losses2, _ = run_procrustes(dict(lr=1.5, reorth_every=4), steps=30)
    assert losses1 == losses2
    assert torch.equal(r1.detach(), r2.detach())
    assert torch.equal(opt1.state[r1]["momentum_buffer"], opt2.state[r2]["momentum_buffer"])


def test_float64_parameters_stay_float64_and_on_the_manifold():
    r, opt, losses, errors = run_procrustes(dict(lr=1.5, fixed_point_iters=30), dtype=torch.float64, steps=60)
    assert r.dtype == torch.float64
    assert opt.state[r]["momentum_buffer"].dtype == torch.float64
    assert max(errors) < 1e-12
    assert losses[-1] < 0.2 * losses[0]


def test_bfloat16_parameter_keeps_float32_momentum_through_resume():
    x = random_orthogonal(16, seed=14).to(torch.bfloat16)
    grad = torch.randn(16, 16, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    param = torch.nn.Parameter(x.clone())
    param.grad = grad
    opt = CayleySGD([param], lr=0.1)
    opt.step()
    assert param.dtype == torch.bfloat16
    saved = copy.deepcopy(opt.state_dict())
    other = torch.nn.Parameter(x.clone())
    fresh = CayleySGD([other], lr=0.1)
    fresh.load_state_dict(saved)
    buffer = fresh.state[other]["momentum_buffer"]
    assert buffer.dtype == torch.float32
    assert torch.equal(buffer, opt.state[param]["momentum_buffer"])


def test_geoopt_manifold_parameters_are_updated_like_plain_ones():
    geoopt = pytest.importorskip("geoopt")
    x = random_orthogonal(16, seed=16)
    grad = torch.randn(16, 16, generator=torch.Generator().manual_seed(17))
    plain = torch.nn.Parameter(x.clone())
    manifold = geoopt.ManifoldParameter(x.clone(), manifold=geoopt.Stiefel())
    for p in (plain, manifold):
        p.grad = grad.clone()
        CayleySGD([p], lr=1.5).step()
    assert isinstance(manifold, geoopt.ManifoldParameter)
    assert torch.equal(plain.detach(), manifold.detach())


def test_parameters_without_grad_are_skipped_and_closure_loss_is_returned():
    frozen = torch.nn.Parameter(random_orthogonal(8, seed=18))
    live = torch.nn.Parameter(random_orthogonal(8, seed=19))
    before = frozen.detach().clone()
    opt = CayleySGD([frozen, live], lr=0.5)

    def closure():
        opt.zero_grad()
        loss = (live * torch.arange(64.0).view(8, 8)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(frozen.detach(), before)
    assert frozen not in opt.state
    assert live in opt.state


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CayleySGD([torch.nn.Parameter(torch.zeros(4))]), "2-D"),
        (lambda: CayleySGD([torch.nn.Parameter(torch.zeros(3, 5))]), r"rows >= columns.*\(3, 5\)"),
        (lambda: CayleySGD([torch.nn.Parameter(torch.eye(3))], lr=0.0), "lr must be > 0"),
        (lambda: CayleySGD([torch.nn.Parameter(torch.eye(3))], momentum=1.0), "momentum"),
        (lambda: CayleySGD([torch.nn.Parameter(torch.eye(3))], reorth_every=-1), "reorth_every"),
        (lambda: CayleySGD([torch.nn.Parameter(torch.eye(3))], fixed_point_iters=1.5), "fixed_point_iters"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_max_orthogonality_error_matches_dense_reference():
    x = random_orthogonal(10, 6, seed=20, dtype=torch.float64)
    bumped = x.clone()
    bumped[2, 3] += 1e-3
    expected = (bumped.T @ bumped - torch.eye(6, dtype=torch.float64)).abs().max().item()
    assert max_orthogonality_error([x]) < 1e-14
    assert max_orthogonality_error([x, bumped]) == pytest.approx(expected, rel=1e-12)
    assert max_orthogonality_error([]) == 0.0


@pytest.mark.parametrize("shape", [(12, 12), (12, 5)])
def test_tangent_part_is_the_orthogonal_projection_onto_the_tangent_space(shape):
    n, p = shape
    x = random_orthogonal(n, p, seed=23, dtype=torch.float64)
    gen = torch.Generator().manual_seed(24)
    g = torch.randn(n, p, generator=gen, dtype=torch.float64)
    t = tangent_part(x, g)
    # tangent at x: X^T T is skew-symmetric
    torch.testing.assert_close(x.T @ t, -(x.T @ t).T, rtol=0, atol=1e-12)
    # orthogonal: what it drops, X S with S symmetric, is normal to every tangent vector X A + (I - X X^T) B
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    b = torch.randn(n, p, generator=gen, dtype=torch.float64)
    v = x @ (a - a.T) + (torch.eye(n, dtype=torch.float64) - x @ x.T) @ b
    assert abs(torch.sum((g - t) * v).item()) < 1e-10
    torch.testing.assert_close(tangent_part(x, t), t, rtol=0, atol=1e-12)  # a projection
    # a purely normal gradient (what stretching x would follow) has no tangent part
    sym = a + a.T
    assert tangent_part(x, x @ sym).abs().max().item() < 1e-12
    assert tangent_part(x.float(), g.float()).dtype == torch.float32


@pytest.mark.parametrize("noise", [1e-3, 3e-2, 1.0])  # Newton-Schulz path, and the SVD fallback
def test_polar_orthonormalize_matches_svd_polar_factor(noise):
    x = random_orthogonal(20, 12, seed=21, dtype=torch.float64)
    x = x + noise * torch.randn(20, 12, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(polar_orthonormalize(x), u @ vh, rtol=0, atol=1e-12)
    assert polar_orthonormalize(x.float()).dtype == torch.float32
