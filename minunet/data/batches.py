"""Batches: the seeded order of each epoch, augmentation, and a loader that builds the next batch ahead.

Batches are float32 (B, 1, size, size): images scaled by 1/255, masks 0/1.

Reproducibility: the order of epoch e is ``default_rng([seed, e])``'s
permutation and batch b's augmentation draws from ``default_rng([seed, e, b])``,
so any batch of any epoch can be rebuilt without replaying the ones before it
(a resumed run skips exactly the batches it had done).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from minunet.data.decode import ArraySet


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training images in epoch ``epoch`` (0-based): a seeded permutation."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def repeat_severe(lung_masks, lesion_masks, times: int, share: float = 0.5) -> np.ndarray:
    """The training list of an epoch, as image ids: every image once, and the severe ones (the lesion
    mask covers at least ``share`` of the lung mask) ``times`` times in all. Ids ascending, then the
    repeats: the epoch's seeded permutation mixes them. uint8 (N, S, S) masks (memory-mapped is fine)."""
    n = len(lung_masks)
    ids = np.arange(n)
    if times <= 1:
        return ids
    lung = np.array([np.count_nonzero(lung_masks[i]) for i in range(n)])
    lesion = np.array([np.count_nonzero(lesion_masks[i]) for i in range(n)])
    severe = np.flatnonzero((lung > 0) & (lesion >= share * lung))
    return np.concatenate([ids] + [severe] * (times - 1))


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@dataclass
class Augment:
    """Seeded augmentation: lesion whitening (optional), a small rotation and shift (image bilinear,
    mask nearest), then intensity.

    intensity: x -> clip(contrast * x**gamma + brightness, 0, 1).

    Lesion whitening (``whiten > 0``, lung training with the data's infection masks): with probability
    ``whiten`` the infected region L of the image is brought towards the brightness of soft tissue,

        x -> x + a * blur(L) * max(t - x, 0),   a ~ U(0.3, 0.8),  t = the image's 80th percentile,

    before the geometry, while the lung mask stays as it is. In severe COVID-19 the consolidated lung is
    as white as the heart and the diaphragm, and a model trained on mostly aerated (dark) lungs leaves
    it out; whitening teaches that a white region inside the lung outline is still lung. ``blur`` is a
    Gaussian of sigma ``4 * S / 256`` px, so the whitened region fades in as consolidation does. Only
    brightens (max(., 0)), and only where L is, so a Normal image (empty L) is unchanged. Its draws
    come after the others, so a run without it draws the same rotations and intensities as before."""

    max_rotate: float = 7.0  # degrees
    max_shift: float = 0.06  # fraction of the size
    contrast: float = 0.15  # factor in [1 - c, 1 + c]
    brightness: float = 0.08  # added, in [-b, b]
    gamma: float = 0.25  # exponent in [1/(1+g), 1+g]
    whiten: float = 0.0  # probability of lesion whitening (needs the lesion mask)

    def apply(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None = None,
              moved_lesion: bool = False):
        """img uint8 (S,S), mask uint8 (S,S), lesion uint8 0/1 (S,S) or None -> float32 image in [0, 1],
        uint8 mask, and with ``moved_lesion`` the lesion mask moved as the mask is (uint8, nearest): the
        pixel weights of ``--lesion-weight`` follow the geometry. It draws nothing more."""
        s = img.shape[-1]
        angle = rng.uniform(-self.max_rotate, self.max_rotate)
        tx, ty = (int(round(v)) for v in rng.uniform(-self.max_shift * s, self.max_shift * s, 2))
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        g = float(np.exp(rng.uniform(-np.log1p(self.gamma), np.log1p(self.gamma))))
        if self.whiten > 0 and lesion is not None:
            img = whiten_lesion(img, lesion, rng, self.whiten)
        im = Image.fromarray(np.ascontiguousarray(img)).rotate(angle, Image.BILINEAR, translate=(tx, ty))
        mk = Image.fromarray(np.ascontiguousarray(mask)).rotate(angle, Image.NEAREST, translate=(tx, ty))
        x = np.asarray(im, np.float32) / np.float32(255)
        x = np.clip(c * np.power(x, g) + b, 0, 1).astype(np.float32)
        if not moved_lesion:
            return x, np.asarray(mk, np.uint8)
        ls = Image.fromarray(np.ascontiguousarray(lesion, np.uint8)).rotate(angle, Image.NEAREST, translate=(tx, ty))
        return x, np.asarray(mk, np.uint8), np.asarray(ls, np.uint8)


def whiten_lesion(img: np.ndarray, lesion: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """``Augment``'s lesion whitening of uint8 ``img`` (S,S) inside the 0/1 ``lesion`` mask, with probability p.

    Always draws two numbers (whether to whiten, and a), so the draws of a batch do not depend on the
    images' masks."""
    do, a = rng.uniform() < p, rng.uniform(0.3, 0.8)
    if not do or not lesion.any():
        return img
    sigma = 4.0 * img.shape[-1] / 256
    soft = Image.fromarray(np.ascontiguousarray(lesion, np.uint8) * np.uint8(255))
    soft = soft.filter(ImageFilter.GaussianBlur(sigma))
    soft = np.asarray(soft, np.float32) / np.float32(255)
    x = img.astype(np.float32)
    t = np.float32(np.percentile(x, 80))
    x = x + np.float32(a) * soft * np.maximum(t - x, np.float32(0))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def lesion_weights(lesion_masks: np.ndarray, weight: float) -> np.ndarray:
    """Per-pixel BCE weights (B,1,S,S) float32 from 0/1 lesion masks (B,S,S): ``weight`` inside, 1 outside."""
    return (1 + (np.float32(weight) - 1) * (lesion_masks > 0)).astype(np.float32)[:, None]


def make_batch(data: ArraySet, ids, augment: Augment | None = None, rng=None, lesions: np.ndarray | None = None,
               lesion_weight: float = 1.0):
    """x float32 (B,1,S,S) in [0,1], y float32 (B,1,S,S) in {0,1} and w for the images ``ids``. ``lesions``
    (uint8 (N,S,S), the infection masks of ``data``'s images) feeds the augmentation's lesion whitening and
    the pixel weights w (``lesion_weights``, moved with the image); w is None when ``lesion_weight`` is 1."""
    ids = np.asarray(ids)
    weigh = lesion_weight != 1
    if weigh and lesions is None:
        raise ValueError("a lesion weight needs the lesion masks")
    sorted_ids, back = np.sort(ids), np.argsort(np.argsort(ids))  # sorted reads from the memmap, then batch order
    imgs = np.asarray(data.images[sorted_ids])[back]
    msks = np.asarray(data.masks[sorted_ids])[back]
    les = None if lesions is None else np.asarray(lesions[sorted_ids])[back]
    if augment is None:
        x = imgs.astype(np.float32) / np.float32(255)
        y = msks.astype(np.float32)
    else:
        x = np.empty(imgs.shape, np.float32)
        y = np.empty(imgs.shape, np.float32)
        for k in range(len(ids)):
            out = augment.apply(imgs[k], msks[k], rng, None if les is None else les[k], moved_lesion=weigh)
            x[k], y[k] = out[0], out[1]
            if weigh:
                les[k] = out[2]  # the lesion as the image was moved: its pixel weights
    w = lesion_weights(les, lesion_weight) if weigh else None
    return x[:, None], y[:, None], w


class BatchLoader:
    """Batches ``start..n_batches-1`` of one epoch, built by a background thread one batch ahead.

    Batch b holds ``order[b*B:(b+1)*B]`` (the last one may be short) and is
    augmented with ``default_rng([seed, epoch, b])``; iterating yields
    (b, x, y, w) (w: ``make_batch``'s pixel weights, None when ``lesion_weight`` is 1). ``items``: the
    image ids an epoch goes through (default: each image once; see ``repeat_severe``); the order is
    ``items`` permuted by ``epoch_order``."""

    def __init__(self, data: ArraySet, batch_size: int, seed: int, epoch: int, start: int = 0,
                 augment: Augment | None = None, prefetch: int = 2, lesions: np.ndarray | None = None,
                 items: np.ndarray | None = None, lesion_weight: float = 1.0):
        self.lesions, self.lesion_weight = lesions, lesion_weight
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, epoch
        items = np.arange(len(data)) if items is None else np.asarray(items)
        self.order = items[epoch_order(len(items), seed, epoch)]
        self.n_batches = num_batches(len(items), batch_size)
        self.start, self.augment, self.prefetch = start, augment, prefetch

    def batch(self, b: int):
        ids = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, b])
        return make_batch(self.data, ids, self.augment, rng, self.lesions, self.lesion_weight)

    def __len__(self):
        return max(0, self.n_batches - self.start)

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for b in range(self.start, self.n_batches):
                    if not put((b, *self.batch(b))):
                        return
                put(None)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        t = threading.Thread(target=work, name="minunet-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)


def iter_eval_batches(data: ArraySet, batch_size: int):
    """(start index, x, y) over every image in order, no augmentation (y is None without masks)."""
    for s in range(0, len(data), batch_size):
        ids = np.arange(s, min(s + batch_size, len(data)))
        x = np.asarray(data.images[ids]).astype(np.float32)[:, None] / np.float32(255)
        y = None if data.masks is None else np.asarray(data.masks[ids]).astype(np.float32)[:, None]
        yield s, x, y
