"""BatchNorm re-estimation: refresh a component's BN statistics on training images.

Removing input channels shifts the mean and variance of what a BatchNorm sees, while the
layers after it were trained on normalised inputs. Re-estimating each BN's running mean and
variance on a few thousand training images (forward passes only: no labels, no gradients,
no weight changes other than the BN statistics) restores that normalisation. The images
should be drawn from the source model's own training distribution (all its classes), since
that is what the statistics described. Pruning work calls this "adaptive BN" (EagleEye,
ECCV 2020); here it is an option of disassembly, off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.device import to_device_of
from ..runtime.hooks import preserved_state

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *,
                          batch_size: int = 250) -> list[str]:
    """Replace the running statistics of every BatchNorm with ones measured on ``images``.

    The statistics are the exact average over the batches (``momentum=None``) of each
    batch's mean and unbiased variance, measured in one pass with every BN in train mode
    (so a BN sees its input normalised by the earlier BNs' batch statistics, as in training).
    Affine parameters and every other weight stay as they are; the model's train/eval flags
    and ``momentum`` are restored. Returns the names of the BN layers updated (BNs without
    running statistics are left alone).
    """
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, _NORMS) and m.track_running_stats}
    if not norms or len(images) == 0:
        return []
    momenta = {name: m.momentum for name, m in norms.items()}
    with preserved_state(model):
        model.eval()
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for start in range(0, len(images), batch_size):
                model(to_device_of(images[start:start + batch_size], model))
        finally:
            for name, m in norms.items():
                m.momentum = momenta[name]
    return list(norms)
