"""The full KL divergence of a student's next-token distribution from a teacher's, from logits.

The learners that train through the whole quantized model (duquant.learn.e2e, duquant.learn.norms)
use its compact form against the teacher's top-k targets (duquant.learn.teacher.top_k_kl); this is
the exact reference that form is checked against.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_from_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over tokens of KL(p_teacher || p_student) from logits [..., vocab]."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()
