import numpy as np
import pytest

from minunet.metrics import ScoreAccumulator, dice_per_image, dice_pooled, iou_per_image, iou_pooled


def test_dice_and_iou_of_a_known_pair():
    pred = np.zeros((4, 4), bool)
    target = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 pixels
    target[0, 1:] = True  # 3 pixels, 2 shared
    assert dice_per_image(pred, target)[0] == pytest.approx(2 * 2 / 6)
    assert iou_per_image(pred, target)[0] == pytest.approx(2 / 4)


def test_empty_rule():
    empty = np.zeros((1, 5, 5), bool)
    full = np.ones((1, 5, 5), bool)
    assert dice_per_image(empty, empty)[0] == 1.0  # both empty: perfect
    assert iou_per_image(empty, empty)[0] == 1.0
    assert dice_per_image(full, empty)[0] == 0.0  # one empty: nothing right
    assert dice_per_image(empty, full)[0] == 0.0
    assert iou_per_image(empty, full)[0] == 0.0


def test_pooled_differs_from_mean_per_image():
    pred = np.zeros((2, 1, 10, 10), bool)
    target = np.zeros((2, 1, 10, 10), bool)
    target[0, 0] = True  # a big mask, predicted perfectly
    pred[0, 0] = True
    target[1, 0, 0, 0] = True  # a one-pixel mask, missed
    per_image = dice_per_image(pred, target)
    np.testing.assert_allclose(per_image, [1.0, 0.0])
    assert dice_pooled(pred, target) == pytest.approx(2 * 100 / 201)
    assert iou_pooled(pred, target) == pytest.approx(100 / 101)


def test_accumulator_matches_one_shot():
    rng = np.random.default_rng(0)
    pred = rng.random((7, 8, 8)) > 0.5
    target = rng.random((7, 8, 8)) > 0.6
    target[3] = False
    acc = ScoreAccumulator()
    acc.add(pred[:4], target[:4])
    acc.add(pred[4:], target[4:])
    s = acc.summary()
    assert s["n_images"] == 7 and s["n_empty_masks"] == 1
    assert s["dice"] == pytest.approx(dice_per_image(pred, target).mean())
    assert s["iou"] == pytest.approx(iou_per_image(pred, target).mean())
    assert s["dice_pooled"] == pytest.approx(dice_pooled(pred, target))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
