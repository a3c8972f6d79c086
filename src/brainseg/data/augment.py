"""Batched augmentation on the training device: one affine_grid + grid_sample per batch.

Random parameters are drawn on the CPU from the run's seeded generator (a fixed number of
draws per sample whatever the settings, so the random stream and therefore resume and
determinism do not depend on which augmentations are switched on), then moved to the device.
Geometry (flips, rotation, scale) is one affine warp per sample; masks are resampled with
nearest neighbour, or bilinear then > 0.5; brightness/contrast change the image only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from brainseg.config import TrainConfig

#: Random numbers drawn per sample (hflip, vflip, angle, scale, brightness, contrast).
DRAWS_PER_SAMPLE = 6
_DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class AugmentSettings:
    """The augmentation knobs of :class:`brainseg.config.TrainConfig` (``aug_<name>``);
    the defaults are TrainConfig's."""

    hflip: float = _DEFAULTS.aug_hflip
    vflip: float = _DEFAULTS.aug_vflip
    rotate: float = _DEFAULTS.aug_rotate
    scale: float = _DEFAULTS.aug_scale
    brightness: float = _DEFAULTS.aug_brightness
    contrast: float = _DEFAULTS.aug_contrast
    mask_mode: str = _DEFAULTS.aug_mask_mode

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> AugmentSettings:
        """The aug_* fields of ``cfg``, by name."""
        return cls(**{f.name: getattr(cfg, f"aug_{f.name}") for f in fields(cls)})


def draw(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n x DRAWS_PER_SAMPLE`` uniform [0, 1) numbers from ``generator`` (on the CPU)."""
    return torch.rand(n, DRAWS_PER_SAMPLE, generator=generator)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor, s: AugmentSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``images`` float N x C x H x W in [0, 255], ``masks`` float N x 1 x H x W.

    ``u`` holds the uniform draws of :func:`draw` for these N samples (any device).
    Returns new tensors of the same shapes; masks stay exactly 0/1.
    """
    n = images.shape[0]
    u = u.to(device=images.device, dtype=torch.float32)
    sx = torch.where(u[:, 0] < s.hflip, -1.0, 1.0)
    sy = torch.where(u[:, 1] < s.vflip, -1.0, 1.0)
    angle = (u[:, 2] * 2 - 1) * math.radians(s.rotate)
    zoom = 1.0 + (u[:, 3] * 2 - 1) * s.scale  # > 1 zooms in
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates to input coordinates (normalised to [-1, 1]).
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * sy
    theta[:, 1, 0] = sin * sx
    theta[:, 1, 1] = cos * sy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    if s.mask_mode == "nearest":
        masks = F.grid_sample(
            masks, grid.to(masks.dtype), mode="nearest", padding_mode="zeros", align_corners=False
        )
    else:
        masks = F.grid_sample(
            masks, grid.to(masks.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        masks = (masks > 0.5).to(masks.dtype)
    # Intensity: contrast around each image's mean, then a brightness shift.
    c = (1.0 + (u[:, 5] * 2 - 1) * s.contrast).view(n, 1, 1, 1)
    b = ((u[:, 4] * 2 - 1) * s.brightness * 255.0).view(n, 1, 1, 1)
    if s.contrast or s.brightness:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * c.to(images.dtype) + mean + b.to(images.dtype)).clamp_(0, 255)
    return images, masks
