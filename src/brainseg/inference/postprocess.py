"""Turn probabilities into masks: threshold, small-object removal, largest 3D component.

numpy + scipy only: this module is on the torch-free ONNX predict path. Connectivity is
full (8 neighbours in 2D, 26 in 3D), so a diagonal step still joins a component.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from brainseg.data.imageio import resize_prob
from brainseg.settings import DEFAULT_THRESHOLD  # also imported from here (train, cv)


def binarize(prob: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean mask of ``prob >= threshold`` (any shape)."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return np.asarray(prob) >= threshold


def _slice_structure(ndim: int) -> np.ndarray:
    """8-connectivity within each slice (last two axes), no connection between slices."""
    s = np.zeros((3,) * ndim, dtype=bool)
    s[(1,) * (ndim - 2)] = True  # the middle plane of the leading axes
    return s


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop components smaller than ``min_size`` pixels, each H x W slice on its own."""
    m = np.asarray(mask) != 0
    if min_size <= 1 or not m.any():
        return m.copy()
    labels, sizes = label_slices(m)
    return filter_labels(labels, sizes, min_size)


def label_slices(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sizes)`` of the 2D components of every slice (``sizes[0]``: background):
    labelled once, a tuning loop tries many sizes with :func:`filter_labels` cheaply."""
    m = np.asarray(mask) != 0
    if m.ndim < 2:
        raise ValueError(f"expected H x W or N x H x W masks, got shape {m.shape}")
    labels, _ = ndimage.label(m, structure=_slice_structure(m.ndim))
    return labels, np.bincount(labels.ravel())


def filter_labels(labels: np.ndarray, sizes: np.ndarray, min_size: int) -> np.ndarray:
    """The mask of the labelled components with at least ``min_size`` pixels."""
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def keep_largest_3d(volume: np.ndarray) -> np.ndarray:
    """Keep only the largest 3D connected component of a patient's stacked slices (S x H x W,
    or one H x W slice); ties go to the component met first in memory order."""
    v = np.asarray(volume) != 0
    out = np.zeros_like(v)
    if not v.any():
        return out
    # Label only the bounding box of the mask: same components, far less work when the
    # mask is small (the usual case for a tumor).
    box = ndimage.find_objects(v.astype(np.uint8))[0]
    sub = v[box]
    labels, n = ndimage.label(sub, structure=ndimage.generate_binary_structure(v.ndim, v.ndim))
    if n == 1:
        out[box] = sub
        return out
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out[box] = labels == int(np.argmax(sizes))
    return out


def apply(
    prob: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    min_size: int = 0,
    largest: bool = False,
    groups: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities at the image's own size -> mask, the one rule of eval, predict and export:
    threshold, 2D components under ``min_size`` out, then (``largest``) the largest 3D one
    per patient (of ``groups``, slices in ``order``)."""

    mask = binarize(prob, threshold)
    if min_size > 1:
        mask = remove_small(mask, min_size)
    if largest:
        mask = keep_largest_3d(mask) if groups is None else largest_per_group(mask, groups, order)
    return mask


def proba_at_size(prob: np.ndarray, size: tuple[int, int], *, padded: bool = False) -> np.ndarray:
    """A model's output at the image's own ``size`` (H, W): cropped when ``padded``, else resized
    back (bilinear); masks are thresholded after this, so a mask is its thresholded map."""
    p = np.asarray(prob, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if padded:
        return np.ascontiguousarray(p[..., :h, :w])
    if p.shape[-2:] == (h, w):
        return p
    if p.ndim == 2:
        return resize_prob(p, (h, w))
    return np.stack([resize_prob(pi, (h, w)) for pi in p])


def mask_from_output(
    prob: np.ndarray,
    size: tuple[int, int],
    threshold: float = DEFAULT_THRESHOLD,
    min_size: int = 0,
    *,
    padded: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, mask) at the image's own ``size``: what predict writes, eval scores."""

    full = proba_at_size(prob, size, padded=padded)
    return full, apply(full, threshold, min_size)


def largest_per_group(
    mask: np.ndarray, groups: np.ndarray, order: np.ndarray | None = None
) -> np.ndarray:
    """:func:`keep_largest_3d` applied to each group's slices of an N x H x W stack."""
    m = np.asarray(mask) != 0
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != m.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} entries for {m.shape[0]} slices")
    out = np.zeros_like(m)
    for gid in np.unique(g):
        rows = np.flatnonzero(g == gid)
        if order is not None:
            rows = rows[np.argsort(np.asarray(order)[rows], kind="stable")]
        out[rows] = keep_largest_3d(m[rows])
    return out
