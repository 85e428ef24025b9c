"""The Monte-Carlo Fisher's loss: the model's own outputs with labels sampled from them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_grng.curvature.capture import LossReduction


def sampled_label_loss(outputs: Tensor, likelihood: str, reduction: LossReduction) -> Tensor:
    """The loss whose output gradients give the MC Fisher's statistics.

    ``likelihood="categorical"``: ``outputs`` are logits (last dimension = classes) and the
    labels are drawn from their softmax; ``"gaussian"``: ``outputs`` are the mean of a
    unit-variance Gaussian (loss ``½‖y − outputs‖²`` per row). Rows are reduced like the
    training loss (``reduction``), so a ``(B, T, C)`` output is averaged over B·T rows.
    """
    logits = outputs.reshape(-1, outputs.shape[-1])
    with torch.no_grad():
        if likelihood == "categorical":
            labels = torch.distributions.Categorical(logits=logits.detach()).sample()
        elif likelihood == "gaussian":
            labels = logits.detach() + torch.randn_like(logits)
        else:
            raise ValueError(
                f"invalid likelihood={likelihood!r}; allowed: 'categorical', 'gaussian'."
            )
    if likelihood == "categorical":
        per_row = nn.functional.cross_entropy(logits, labels, reduction="none")
    else:
        per_row = 0.5 * (logits - labels).pow(2).sum(-1)
    return per_row.mean() if reduction is LossReduction.MEAN else per_row.sum()
