import numpy as np
import pytest

from minunet.metrics import ScoreAccumulator, dice_per_image, dice_pooled, iou_per_image, iou_pooled, selection_score


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


# -- often-empty targets: dice_nonempty, fp_image_rate, the selection score -------------------


def _acc(pred, target):
    acc = ScoreAccumulator()
    acc.add(np.asarray(pred, bool), np.asarray(target, bool))
    return acc.summary()


def _masks():
    """Four 2x3 reference masks: two with a lesion, two empty."""
    g = np.zeros((4, 2, 3), bool)
    g[0, 0, :2] = True  # 2 px
    g[1, :, 0] = True  # 2 px
    return g


def test_predicting_nothing_scores_zero_on_lesions_and_no_false_positive_images():
    s = _acc(np.zeros((4, 2, 3)), _masks())
    assert s["dice_nonempty"] == 0.0 and s["n_nonempty"] == 2
    assert s["fp_image_rate"] == 0.0
    assert s["dice"] == 0.5  # the empty-mask rule alone would call this half right
    assert selection_score(s, "infection") == 0.0


def test_painting_everything_marks_every_empty_image_as_a_false_positive():
    s = _acc(np.ones((4, 2, 3)), _masks())
    assert s["fp_image_rate"] == 1.0
    assert s["dice_nonempty"] == pytest.approx(2 * 2 / (6 + 2))  # each lesion image: 2|P&G|/(|P|+|G|) = 4/8
    assert selection_score(s, "infection") == 0.0


def test_hand_computed_nonempty_dice_and_fp_rate():
    g = _masks()
    p = np.zeros_like(g)
    p[0, 0, 0] = True  # image 0: |P&G| = 1, |P| = 1, |G| = 2 -> Dice 2/3
    p[1, :, 0] = True  # image 1: perfect -> 1
    p[2, 1, 2] = True  # image 2: empty reference, one stray pixel -> a false-positive image
    s = _acc(p, g)  # image 3: empty and clean
    assert s["dice_nonempty"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["fp_image_rate"] == pytest.approx(1 / 2)
    assert selection_score(s, "infection") == pytest.approx((2 / 3 + 1) / 2 * (1 - 1 / 2))
    assert selection_score(s, "lung") == s["dice"] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)


def test_figures_over_no_images_are_none_not_nan():
    only_lesions = _acc(np.ones((1, 2, 3)), np.ones((1, 2, 3)))
    assert only_lesions["fp_image_rate"] is None and only_lesions["dice_nonempty"] == 1.0
    assert selection_score(only_lesions, "infection") == 1.0
    only_empty = _acc(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)))
    assert only_empty["dice_nonempty"] is None and only_empty["n_nonempty"] == 0
    assert ScoreAccumulator().summary()["dice"] is None
