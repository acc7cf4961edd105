"""The training losses (spinlearn.losses) against float64 references and transformers' own loss: value, gradient,
top-k, ignored labels, chunking, dtypes, and what they keep for the backward pass."""

from __future__ import annotations

import pytest
import torch

import spinlearn.losses as losses
from spinlearn.losses import IGNORE_INDEX, TokenCE, TokenKL, causal_lm_cross_entropy, kl_teacher_student


def _logits(*shape, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale, torch.randn(*shape, generator=gen) * scale


def _labels(*shape, vocab, seed=0, ignored=0.25):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = IGNORE_INDEX
    return labels


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


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_chunks_change_nothing(monkeypatch, loss):
    """One token per chunk and every token in one chunk give the same loss and gradient, bit for bit (each token's
    sum over the vocabulary is computed the same way in both), for the KL and the cross-entropy."""
    teacher, student = _logits(3, 11, 50, seed=2)
    labels = _labels(3, 11, vocab=50, seed=2)
    fn = {"kl": lambda s: kl_teacher_student(teacher, s), "ce": lambda s: TokenCE.apply(s, labels)}[loss]
    results = []
    for elements in (1, 10_000):
        monkeypatch.setitem(losses.CHUNK_ELEMENTS, "cpu", elements)
        s = student.clone().requires_grad_()
        value = fn(s)
        value.backward()
        results.append((value.detach(), s.grad))
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


# -- the cross-entropy ---------------------------------------------------------------------------------------------

def _ce_reference(logits, labels):
    """torch's cross-entropy in float64 (mean over the labels not ignored)."""
    return torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def test_cross_entropy_value_and_gradient_against_float64():
    """Loss and gradient ((softmax - onehot) / counted labels, times the incoming gradient) equal float64
    cross_entropy's; ignored labels give their rows no gradient."""
    logits, _ = _logits(3, 7, 64, seed=6)
    labels = _labels(3, 7, vocab=64, seed=6)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    x64 = logits.double().requires_grad_()
    (1.7 * _ce_reference(x64, labels)).backward()
    x32 = logits.clone().requires_grad_()
    loss = TokenCE.apply(x32, labels)
    (1.7 * loss).backward()
    assert loss.item() == pytest.approx(_ce_reference(logits, labels).item(), rel=1e-6)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-9)
    assert x32.grad[labels == IGNORE_INDEX].abs().max() == 0
    assert x32.grad[labels != IGNORE_INDEX].abs().max() > 1e-3


def test_causal_lm_cross_entropy_is_transformers_loss():
    """The shifted loss of transformers' causal LMs (position t predicts label t + 1), value and gradient, with
    ignored labels, against the model's own ``labels=`` loss on a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 101, (2, 9))
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = IGNORE_INDEX
    grads = []
    for ours in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, labels=None if ours else labels, use_cache=False)
        loss = causal_lm_cross_entropy(out.logits, labels) if ours else out.loss
        loss.backward()
        grads.append((loss.detach(), model.lm_head.weight.grad.clone()))
    assert grads[1][0].item() == pytest.approx(grads[0][0].item(), rel=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-7)


def test_training_loss_weighs_its_terms_and_needs_one():
    """The trainer's loss: ce_weight x the model's own cross-entropy + kl_weight x the KL to its passed-through self
    (0 for a model without wrappers); both weights 0 is refused naming the keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 8))
    reference = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    loss, outputs = losses.training_loss(model, ids, ce_weight=0.5, kl_weight=2.0)
    assert loss.item() == pytest.approx(0.5 * reference, rel=1e-5)
    assert outputs.logits.shape == (2, 8, 97)
    with pytest.raises(ValueError, match="loss.ce_weight and loss.kl_weight are both 0"):
        losses.training_loss(model, ids, ce_weight=0.0, kl_weight=0.0)


def test_cross_entropy_in_bfloat16_keeps_the_dtype_and_matches_float32():
    logits, _ = _logits(5, 96, seed=8)
    labels = _labels(5, vocab=96, seed=8, ignored=0.0)
    x16 = logits.bfloat16().requires_grad_()
    loss = TokenCE.apply(x16, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x16.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(_ce_reference(x16.detach().float(), labels).item(), rel=1e-5)


def test_cross_entropy_with_every_label_ignored_is_zero():
    logits, _ = _logits(2, 4, 10, seed=9)
    x = logits.requires_grad_()
    loss = TokenCE.apply(x, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0


def test_cross_entropy_keeps_one_tensor_of_the_logits_size():
    """Autograd keeps TokenCE's gradient and nothing else; float32 cross_entropy on upcast half-precision logits
    (transformers' loss) keeps a float32 log-softmax of the logits' size."""
    logits, _ = _logits(8, 1000, seed=10)
    labels = _labels(8, vocab=1000, seed=10)
    saved = []

    def measured(fn):
        saved.clear()
        x = logits.bfloat16().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn(x)
        return sum(saved)

    ours = measured(lambda x: TokenCE.apply(x, labels))
    assert ours == logits.numel() * 2  # one bfloat16 tensor
    theirs = measured(lambda x: torch.nn.functional.cross_entropy(x.float(), labels, ignore_index=IGNORE_INDEX))
    assert theirs >= logits.numel() * 4


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([[1, 2, 3]]), r"labels \(1, 3\) do not match logits \(1, 4, 10\)"),
    (torch.tensor([[1, 2, 10, IGNORE_INDEX]]), r"label 10 is outside the vocabulary \[0, 10\)"),
    (torch.tensor([[1, -5, 2, 3]]), r"label -5 is outside the vocabulary"),
])
def test_cross_entropy_refuses_bad_labels(labels, match):
    logits, _ = _logits(1, 4, 10)
    with pytest.raises(ValueError, match=match):
        TokenCE.apply(logits, labels)
