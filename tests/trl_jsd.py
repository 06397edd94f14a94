"""TRL's generalised Jensen-Shannon divergence (GKDTrainer.generalized_jsd_loss), written out here
as TRL computes it, for the tests that compare kdfused's "jsd" with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature):
    """TRL's loss per token (summed over the vocabulary, before TRL's reduction): both logits
    tempered, no T^2; beta = 0 and 1 are the two KLs, otherwise the log-space mixture goes
    through logsumexp."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]),
            dim=0,
        )
        kl_teacher = F.kl_div(
            mixture_log_probs, teacher_log_probs, reduction="none", log_target=True
        )
        kl_student = F.kl_div(
            mixture_log_probs, student_log_probs, reduction="none", log_target=True
        )
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1)
