"""The distillation loss: KL(teacher || student) per token, averaged over tokens.

KL(t || s) = sum_v p_t (log p_t - log p_s) (the usual distillation direction); its gradient with respect to the
student's logits is (softmax(s) - softmax(t)) / tokens. ``TokenKL`` computes both in one pass over chunks of
tokens and keeps only that gradient for the backward pass: the teacher's logits can go as soon as the loss is
known, and no log-softmax, softmax or product of the vocabulary's width is kept for autograd (composed from
``log_softmax`` and ``kl_div`` it kept two float32 copies of the logits and built three more in the backward, a
gigabyte each for 2048 tokens of a 128k vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fakequant import float_passthrough

# Logit elements one chunk of ``TokenKL`` works on (its float32 temporaries: a few of this size). On a CPU a chunk
# that stays in cache (8 MiB of float32) is fastest; an accelerator wants fewer, larger kernels.
KL_CHUNK_ELEMENTS = {"cpu": 1 << 21}
KL_CHUNK_ELEMENTS_ACCELERATOR = 1 << 25


def _log_softmax_and_softmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """log p and p over the last dim, in float32, with one exp per element."""
    z = x.float() - x.amax(-1, keepdim=True).float()
    e = z.exp()
    total = e.sum(-1, keepdim=True)
    return z.sub_(total.log()), e.div_(total)


class TokenKL(torch.autograd.Function):
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
        tokens = s.shape[0]
        chunk = max(1, KL_CHUNK_ELEMENTS.get(s.device.type, KL_CHUNK_ELEMENTS_ACCELERATOR) // vocab)
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

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None


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
