"""Post-processing of predicted masks: keep the K largest connected components; draw overlays.

Connected components (4-connectivity) are found on runs: each row's runs of
foreground pixels are nodes of a union-find, and a run is joined to every run
of the row above that shares a column with it. No scipy needed.
"""

from __future__ import annotations

import numpy as np


def _runs(row: np.ndarray):
    """(starts, ends) of the runs of True in a 1-D bool array; ends are exclusive."""
    padded = np.concatenate(([0], row.astype(np.int8), [0]))
    d = np.diff(padded)
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def label_components(mask: np.ndarray):
    """labels (H,W) int32 (0 = background, 1..n components, in order of first pixel) and sizes (n,)."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"expected one (H, W) mask, got shape {mask.shape}")
    rows, starts, ends = [], [], []
    first_run = []  # index of each row's first run
    for r in range(mask.shape[0]):
        s, e = _runs(mask[r])
        first_run.append(len(starts))
        rows += [r] * len(s)
        starts += s.tolist()
        ends += e.tolist()
    first_run.append(len(starts))
    parent = list(range(len(starts)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for r in range(1, mask.shape[0]):
        i, i_end = first_run[r - 1], first_run[r]  # runs of the row above
        j, j_end = first_run[r], first_run[r + 1]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:  # they share a column
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros(mask.shape, np.int32)
    ids, sizes = {}, []
    for n in range(len(starts)):
        root = find(n)
        if root not in ids:
            ids[root] = len(ids) + 1
            sizes.append(0)
        lab = ids[root]
        labels[rows[n], starts[n] : ends[n]] = lab
        sizes[lab - 1] += ends[n] - starts[n]
    return labels, np.asarray(sizes, np.int64)


def keep_largest(mask: np.ndarray, k: int) -> np.ndarray:
    """The mask with only its k largest connected components (k <= 0 keeps everything).

    Works on one (H, W) mask or a batch (N, H, W) / (N, 1, H, W)."""
    mask = np.asarray(mask).astype(bool)
    if k <= 0:
        return mask
    if mask.ndim > 2:
        return np.stack([keep_largest(m, k) for m in mask.reshape(-1, *mask.shape[-2:])]).reshape(mask.shape)
    labels, sizes = label_components(mask)
    if len(sizes) <= k:
        return mask
    keep = np.argsort(-sizes, kind="stable")[:k] + 1
    return np.isin(labels, keep)


def drop_small(mask: np.ndarray, min_share: float) -> np.ndarray:
    """The mask without its connected components smaller than ``min_share`` of the image's pixels
    (0 keeps everything). One (H, W) mask or a batch (N, H, W) / (N, 1, H, W). For lesion masks: a
    scattered speck on a healthy lung is the typical false positive, while the lesions of this data
    are large regions."""
    mask = np.asarray(mask).astype(bool)
    if min_share <= 0:
        return mask
    if mask.ndim > 2:
        return np.stack([drop_small(m, min_share) for m in mask.reshape(-1, *mask.shape[-2:])]).reshape(mask.shape)
    labels, sizes = label_components(mask)
    small = np.flatnonzero(sizes < min_share * mask.size) + 1
    return mask & ~np.isin(labels, small) if len(small) else mask


def overlay(gray: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha=0.35) -> np.ndarray:
    """RGB uint8 (H,W,3): the X-ray in gray, the mask tinted, its outline in yellow."""
    g = np.asarray(gray, np.float32)
    m = np.asarray(mask).astype(bool)
    rgb = np.repeat(g[..., None], 3, axis=2)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    rgb[m & ~interior(m)] = (255, 230, 0)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def interior(m: np.ndarray) -> np.ndarray:
    """The (H, W) bool mask eroded by its 4-neighbourhood: its outline is ``m & ~interior(m)``."""
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return inner
