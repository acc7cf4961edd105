"""The training losses, each one lean autograd function: KL(teacher || student) per token (distillation) and the
causal-LM cross-entropy, both averaged over tokens.

KL(t || s) = sum_v p_t (log p_t - log p_s) (the usual distillation direction); its gradient with respect to the
student's logits is (softmax(s) - softmax(t)) / tokens. The cross-entropy's is (softmax(s) - onehot(label)) /
tokens. ``TokenKL`` and ``TokenCE`` compute loss and gradient in one pass over chunks of tokens and keep only that
gradient for the backward pass, in the logits' dtype: no log-softmax, softmax or float32 copy of the vocabulary's
width is kept for autograd (composed from ``log_softmax`` and ``kl_div`` / ``cross_entropy`` on float32 logits, as
transformers' loss does, they kept one or two float32 copies of the logits and built two or three more in the
backward, a gigabyte each for 2048 tokens of a 128k vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fakequant import float_passthrough

# Logit elements one chunk of ``TokenKL`` / ``TokenCE`` works on (their float32 temporaries: a few of this size). On
# a CPU a chunk that stays in cache (8 MiB of float32) is fastest; an accelerator wants fewer, larger kernels.
CHUNK_ELEMENTS = {"cpu": 1 << 21}
CHUNK_ELEMENTS_ACCELERATOR = 1 << 25
# The label that takes no part in the loss (transformers' and torch.nn.CrossEntropyLoss's ignore_index).
IGNORE_INDEX = -100


def _chunk_rows(x: Tensor) -> int:
    """Rows (tokens) of the [tokens, vocab] logits ``x`` one chunk holds."""
    return max(1, CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS_ACCELERATOR) // x.shape[-1])


def _log_softmax_and_softmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """log p and p over the last dim, in float32, with one exp per element."""
    z = x.float() - x.amax(-1, keepdim=True).float()
    e = z.exp()
    total = e.sum(-1, keepdim=True)
    return z.sub_(total.log()), e.div_(total)


class _GradientKept(torch.autograd.Function):
    """A loss whose forward already computed the gradient with respect to its first input and saved it (with that
    input's shape in ``ctx.shape``): the backward only scales it by the incoming gradient (a loss weight)."""

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None


class TokenKL(_GradientKept):
    """KL(teacher || student) averaged over tokens; student and teacher logits [..., vocab], any float dtype (the
    loss in float32; the sum over tokens in float64). The teacher gets no gradient; the student's gradient is kept
    in its own dtype, one tensor of its size."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"KL: student logits {tuple(student.shape)} and teacher logits "
                             f"{tuple(teacher.shape)} differ in shape")
        vocab = student.shape[-1]
        s, t = student.detach().reshape(-1, vocab), teacher.detach().reshape(-1, vocab)
        tokens, chunk = s.shape[0], _chunk_rows(s)
        grad = torch.empty_like(s)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, tokens, chunk):
            log_ps, ps = _log_softmax_and_softmax(s[i:i + chunk])
            log_pt, pt = _log_softmax_and_softmax(t[i:i + chunk])
            total += (pt * log_pt.sub_(log_ps)).sum(-1).sum(dtype=torch.float64)
            grad[i:i + chunk] = ps.sub_(pt).div_(tokens)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return (total / tokens).float()


class TokenCE(_GradientKept):
    """Cross-entropy of logits [..., vocab] (any float dtype) against integer labels [...], averaged over the
    labels that are not ``IGNORE_INDEX`` (torch's ``cross_entropy`` with ``reduction="mean"``; with every label
    ignored the loss is 0, not NaN). The loss in float32 (the sum over tokens in float64); the logits' gradient,
    (softmax - onehot) / counted labels, is kept in their own dtype, one tensor of their size."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        vocab = logits.shape[-1]
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"cross-entropy: labels {tuple(labels.shape)} do not match logits "
                             f"{tuple(logits.shape)} (one label per row of logits)")
        x, y = logits.detach().reshape(-1, vocab), labels.reshape(-1).to(logits.device)
        counted = y != IGNORE_INDEX
        outside = counted & ((y < 0) | (y >= vocab))
        if bool(outside.any()):
            raise ValueError(f"cross-entropy: label {y[outside][0].item()} is outside the vocabulary [0, {vocab}) "
                             f"(and not {IGNORE_INDEX}, the ignored label)")
        count = counted.sum().clamp_(min=1)
        tokens, chunk = x.shape[0], _chunk_rows(x)
        grad = torch.empty_like(x)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, tokens, chunk):
            log_p, p = _log_softmax_and_softmax(x[i:i + chunk])
            keep = counted[i:i + chunk].unsqueeze(-1)
            target = y[i:i + chunk].clamp(0, vocab - 1).unsqueeze(-1)
            total -= log_p.gather(-1, target).mul_(keep).sum(dtype=torch.float64)
            p.scatter_add_(-1, target, keep.to(p.dtype).neg())
            grad[i:i + chunk] = p.mul_(keep).div_(count)
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return (total / count).float()


def causal_lm_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The causal-LM loss of transformers' models (position t predicts label t + 1; the last position and labels
    ``IGNORE_INDEX`` count for nothing; mean over the rest) as ``TokenCE``: logits [batch, seq, vocab], labels
    [batch, seq]. The labels are shifted, not the logits, so no copy of the logits is made."""
    target = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    return TokenCE.apply(logits, target)


@torch.no_grad()
def teacher_logits(model: nn.Module, input_ids: Tensor, forward=None) -> Tensor:
    """The float teacher's logits: ``model`` (wrapped by ``fakequant.wrap_model``) with every wrapper passed through
    (``fakequant.float_passthrough``: a plain float forward), no gradient. ``forward``: what to call instead of
    ``model`` when it runs inside a wrapper (DDP / FSDP; ``model`` is then the unwrapped module)."""
    with float_passthrough(model):
        return (forward or model)(input_ids=input_ids, use_cache=False).logits


def kl_teacher_student(teacher_logits: Tensor, student_logits: Tensor, topk: int | None = None) -> Tensor:
    """KL(teacher || student) per token, averaged over tokens (``TokenKL``). With ``topk`` only the teacher's k most
    likely tokens count, both distributions renormalised over them (OSTQuant's KL-Top): the long tail of a big
    vocabulary no longer dilutes the signal."""
    vocab = teacher_logits.shape[-1]
    t = teacher_logits.reshape(-1, vocab)
    s = student_logits.reshape(-1, vocab)
    if topk is not None and topk < vocab:
        idx = t.topk(topk, dim=-1).indices
        t, s = t.gather(-1, idx), s.gather(-1, idx)
    return TokenKL.apply(s, t)


def training_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None, *, ce_weight: float = 1.0,
                  kl_weight: float = 0.0, kl_topk: int | None = None, unwrapped: nn.Module | None = None):
    """The rotation-learning loss (``loss.*`` of a recipe): ``ce_weight`` x the causal-LM cross-entropy of the
    fake-quantized ``model`` on ``labels`` (default: the inputs) + ``kl_weight`` x KL(float teacher || it), the
    teacher being the same model with every wrapper passed through (``teacher_logits``). ``unwrapped``: the wrapped
    model itself when ``model`` is a DDP / FSDP wrapper around it. Returns (loss, the model's outputs)."""
    if ce_weight <= 0 and kl_weight <= 0:
        raise ValueError("loss.ce_weight and loss.kl_weight are both 0, so there is no loss to train on")
    outputs = model(input_ids=input_ids, use_cache=False)
    terms = []
    if ce_weight > 0:
        terms.append(ce_weight * causal_lm_cross_entropy(outputs.logits, input_ids if labels is None else labels))
    if kl_weight > 0:
        teacher = teacher_logits(unwrapped or model, input_ids, forward=model)
        terms.append(kl_weight * kl_teacher_student(teacher, outputs.logits, kl_topk))
    return sum(terms[1:], terms[0]), outputs
