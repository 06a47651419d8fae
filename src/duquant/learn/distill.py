"""Distillation from the full-precision model: the KL loss and one training step on it.

Both learners that train through the whole quantized model (duquant.learn.e2e's rotations and
duquant.learn.norms' norm weights) fit the quantized model's next-token distribution to the
full-precision teacher's over the calibration windows; this is the loss and the step they share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_from_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over tokens of KL(p_teacher || p_student) from logits [..., vocab]."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill_step(student: nn.Module, teacher, batch: Tensor, opt, sched) -> float:
    """One optimizer step of `student` on its KL from `teacher` (a model or any callable giving
    logits as one) over `batch`; the loss."""
    with torch.no_grad():
        target = teacher(batch).logits
    with torch.enable_grad():  # quantize_model runs under no_grad
        loss = kl_from_teacher(student(batch).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    sched.step()
    return loss.item()
