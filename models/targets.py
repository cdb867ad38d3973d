"""What a language model is trained to predict, shared by the data (which marks positions without a
target), the students (their own loss) and the stages (KD targets): the ignore label, next-token
targets and the teacher's top-k distribution. Below both data and training, so neither imports
the other for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the label of a position without a loss (padding, prompt tokens, the last position): PyTorch's and
# Hugging Face's ignore_index, so their losses skip the same positions
IGNORE = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels aligned with the inputs [B, T] -> targets [B, T]: targets[:, t] = labels[:, t + 1]."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], 1)


def teacher_topk(teacher_logits: torch.Tensor, k: int):
    """Top-k token ids [B, T, k] and their log-probabilities (temperature 1) [B, T, k] in float32."""
    logprobs = F.log_softmax(teacher_logits.float(), -1)
    top = logprobs.topk(k, dim=-1)
    return top.indices, top.values
