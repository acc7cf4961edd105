"""The distillation loss (spinlearn.distill) against float64 references: value, gradient, top-k, chunking, dtypes,
and what it keeps for the backward pass."""

from __future__ import annotations

import pytest
import torch

import spinlearn.distill as distill
from spinlearn.distill import TokenKL, kl_teacher_student


def _logits(*shape, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale, torch.randn(*shape, generator=gen) * scale


def _reference(teacher, student, topk=None):
    """KL(teacher || student) averaged over tokens, float64, composed from log-softmaxes (autograd-ready)."""
    vocab = teacher.shape[-1]
    t, s = teacher.double().reshape(-1, vocab), student.double().reshape(-1, vocab)
    if topk is not None and topk < vocab:
        idx = t.argsort(-1, descending=True)[:, :topk]
        t, s = t.gather(-1, idx), s.gather(-1, idx)
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


@pytest.mark.parametrize("topk", [None, 5, 128, 1000])
def test_kl_teacher_student_against_a_float64_reference(topk):
    """KL(teacher || student) per token; with top-k, both distributions renormalised over the teacher's k most
    likely tokens (k >= vocab: the full KL)."""
    teacher, student = _logits(2, 3, 128)
    ref = _reference(teacher, student, topk).item()
    assert kl_teacher_student(teacher, student, topk).item() == pytest.approx(ref, rel=1e-6)
    if topk == 5:
        assert ref != pytest.approx(kl_teacher_student(teacher, student, None).item(), rel=1e-2)


@pytest.mark.parametrize("topk", [None, 7])
def test_the_student_gradient_is_the_float64_references(topk):
    """(softmax(s) - softmax(t)) / tokens, scaled by the incoming gradient (a loss weight); the teacher gets none."""
    teacher, student = _logits(2, 5, 64, seed=1)
    s64 = student.double().requires_grad_()
    (2.5 * _reference(teacher, s64, topk)).backward()
    s32 = student.clone().requires_grad_()
    t32 = teacher.clone().requires_grad_()
    (2.5 * kl_teacher_student(t32, s32, topk)).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-9)
    assert s32.grad.abs().max() > 1e-3  # not trivially zero
    assert t32.grad is None


def test_chunks_change_nothing(monkeypatch):
    """One token per chunk and every token in one chunk give the same loss and gradient, bit for bit (each token's
    sum over the vocabulary is computed the same way in both)."""
    teacher, student = _logits(3, 11, 50, seed=2)
    results = []
    for elements in (1, 10_000):
        monkeypatch.setitem(distill.KL_CHUNK_ELEMENTS, "cpu", elements)
        s = student.clone().requires_grad_()
        loss = kl_teacher_student(teacher, s)
        loss.backward()
        results.append((loss.detach(), s.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_half_precision_logits_keep_their_dtype_and_match_float32():
    teacher, student = _logits(4, 96, seed=3)
    s16 = student.bfloat16().requires_grad_()
    loss = kl_teacher_student(teacher.bfloat16(), s16)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s16.grad.dtype == torch.bfloat16
    ref = _reference(teacher.bfloat16().float(), s16.detach().float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_identical_distributions_give_zero_and_no_gradient():
    logits, _ = _logits(2, 3, 40, seed=4)
    s = (logits + 5.0).requires_grad_()  # a constant shift: the same distribution
    loss = kl_teacher_student(logits, s)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s.grad.abs().max() < 1e-7


def test_the_backward_keeps_one_tensor_of_the_students_size():
    """What autograd saves between forward and backward: TokenKL keeps its gradient (the student's size) and
    nothing else, where log_softmax + kl_div kept two float32 copies of the logits."""
    teacher, student = _logits(8, 1000, seed=5)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def measured(fn):
        saved.clear()
        s = student.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(teacher, s)
        return sum(saved)

    assert measured(lambda t, s: TokenKL.apply(s, t)) == student.numel()
    composed = measured(lambda t, s: torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="batchmean"))
    assert composed >= 2 * student.numel()


def test_shapes_must_match():
    teacher, student = _logits(2, 10)
    with pytest.raises(ValueError, match=r"student logits \(2, 9\) and teacher logits \(2, 10\)"):
        TokenKL.apply(student[:, :9], teacher)
