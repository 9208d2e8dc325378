import numpy as np
import pytest

from minunet.gradcheck import numeric_gradient
from minunet.losses import (
    IMAGE_TERM_WEIGHT,
    LOSSES,
    bce_with_logits,
    image_bce_with_logits,
    loss_and_grad,
    soft_dice_with_logits,
)
from minunet.opcases import rel_err
from minunet.optim import cosine_lr

rng = np.random.default_rng(3)


@pytest.mark.parametrize("kind", LOSSES)
def test_training_losses_match_finite_differences(kind):
    z = 2 * rng.standard_normal((3, 1, 4, 5))
    y = (rng.random(z.shape) > 0.5).astype(np.float64)
    y[2] = 0  # an empty mask
    _, dz = loss_and_grad(kind, z, y)
    numeric = numeric_gradient(lambda: loss_and_grad(kind, z, y)[0], z)
    assert rel_err(dz, numeric) < 1e-6


@pytest.mark.parametrize("kind", LOSSES)
def test_weighted_losses_match_finite_differences(kind):
    z = 2 * rng.standard_normal((3, 1, 4, 5))
    y = (rng.random(z.shape) > 0.5).astype(np.float64)
    w = np.where(rng.random(z.shape) > 0.6, 5.0, 1.0)
    _, dz = loss_and_grad(kind, z, y, weights=w)
    numeric = numeric_gradient(lambda: loss_and_grad(kind, z, y, weights=w)[0], z)
    assert rel_err(dz, numeric) < 1e-6


def test_weighted_bce_values():
    z = rng.standard_normal((2, 1, 3, 3))
    y = (rng.random(z.shape) > 0.5).astype(float)
    ones = np.ones_like(z)
    assert bce_with_logits(z, y, weights=ones)[0] == pytest.approx(bce_with_logits(z, y)[0], rel=1e-12)
    assert np.allclose(bce_with_logits(z, y, weights=ones)[1], bce_with_logits(z, y)[1], rtol=1e-12)
    # one pixel weighted 3: its loss counts three times, divided by the number of pixels as before
    w = ones.copy()
    w[1, 0, 2, 1] = 3
    per_pixel = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    loss, dz = bce_with_logits(z, y, weights=w)
    assert loss == pytest.approx((per_pixel.sum() + 2 * per_pixel[1, 0, 2, 1]) / z.size, rel=1e-12)
    assert dz[1, 0, 2, 1] == pytest.approx(3 * bce_with_logits(z, y)[1][1, 0, 2, 1], rel=1e-12)
    big = np.array([[[[1e4, -1e4]]]])
    loss, dz = bce_with_logits(big, np.array([[[[0.0, 1.0]]]]), weights=np.full(big.shape, 2.0))
    assert loss == pytest.approx(2e4) and np.isfinite(dz).all()  # stable for any z
    with pytest.raises(ValueError, match="shape"):
        bce_with_logits(z, y, weights=np.ones((2, 1, 3, 2)))


def test_soft_dice_values():
    y = np.zeros((2, 1, 4, 4))
    y[0, 0, :2] = 1
    perfect = np.where(y > 0, 30.0, -30.0)
    assert soft_dice_with_logits(perfect, y)[0] == pytest.approx(0.0, abs=1e-9)
    assert soft_dice_with_logits(-perfect, y)[0] > 0.9  # inverted: image 0 all wrong, image 1 all wrong


def test_bce_plus_dice_is_the_sum():
    z = rng.standard_normal((2, 1, 3, 3))
    y = (rng.random(z.shape) > 0.5).astype(float)
    total, _ = loss_and_grad("bce+dice", z, y)
    assert total == pytest.approx(bce_with_logits(z, y)[0] + soft_dice_with_logits(z, y)[0])


def test_the_image_term_values():
    """By hand: a pixel logit c everywhere gives the image logit c; a sure lesion or a sure empty image
    costs about nothing, the wrong answer costs about |s|; the gradient goes to the surest pixels."""
    y = np.zeros((3, 1, 4, 4))
    y[0, 0, 1, 1] = 1  # image 0 has a lesion; images 1 and 2 have none
    z = np.full(y.shape, -2.0)
    loss, dz = image_bce_with_logits(z, y)
    s = -2.0
    want = ((np.log1p(np.exp(s)) - s) + 2 * np.log1p(np.exp(s))) / 3  # bce(s, 1) + 2 bce(s, 0)
    assert loss == pytest.approx(want, rel=1e-12)
    sig = 1 / (1 + np.exp(-s))
    assert np.allclose(dz[0], (sig - 1) / 3 / 16) and np.allclose(dz[1:], sig / 3 / 16)  # softmax: 1/16 each
    sure = np.where(y > 0, 40.0, -40.0)
    sure[0] = -40.0
    sure[0, 0, 1, 1] = 40.0  # the lesion pixel alone is sure: s = 40 - log(16) > 37
    assert image_bce_with_logits(sure, y)[0] < 1e-12
    loss, dz = image_bce_with_logits(-sure, y)  # lesions painted everywhere: wrong on images 1 and 2 only
    assert loss == pytest.approx((0 + 40 + 40) / 3, rel=1e-9) and np.isfinite(dz).all()
    # one very sure pixel takes the whole gradient of its image
    z = np.full((1, 1, 3, 3), -5.0)
    z[0, 0, 2, 2] = 30.0
    _, dz = image_bce_with_logits(z, np.zeros_like(z))
    assert dz[0, 0, 2, 2] == pytest.approx(1.0, rel=1e-9) and np.abs(dz).sum() == pytest.approx(1.0, rel=1e-9)


def test_bce_dice_image_is_the_weighted_sum():
    z = rng.standard_normal((2, 1, 3, 3))
    y = (rng.random(z.shape) > 0.5).astype(float)
    y[1] = 0
    total, dz = loss_and_grad("bce+dice+image", z, y)
    parts = [bce_with_logits(z, y), soft_dice_with_logits(z, y), image_bce_with_logits(z, y)]
    assert total == pytest.approx(parts[0][0] + parts[1][0] + IMAGE_TERM_WEIGHT * parts[2][0], rel=1e-12)
    assert np.allclose(dz, parts[0][1] + parts[1][1] + IMAGE_TERM_WEIGHT * parts[2][1], rtol=1e-12)


def test_unknown_loss_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown loss"):
        loss_and_grad("l2", np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        bce_with_logits(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3)))


def test_cosine_schedule():
    assert cosine_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 50, 100) == pytest.approx(5e-4)
    assert cosine_lr(1e-3, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(1e-3, 0, 100, warmup_steps=10) == pytest.approx(1e-4)
    lrs = [cosine_lr(1.0, s, 100, warmup_steps=5) for s in range(100)]
    assert max(lrs) == pytest.approx(1.0, rel=1e-3) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
