import numpy as np
import pytest

from minunet.optim import Adam


def test_adam_three_steps_match_hand_computation():
    # Worked by hand: step 1 moves each parameter by lr * sign(g) (bias correction makes
    # m_hat = g and v_hat = g^2); step 2 for p0: m = 0.9*0.05 + 0.1*(-1) = -0.055,
    # v = 0.999*0.00025 + 0.001*1 = 0.00124975, m_hat = -0.055/0.19, v_hat = 0.00124975/0.001999,
    # p = 0.9 - 0.1 * m_hat / (sqrt(v_hat) + 1e-8) = 0.93661...
    params = {"p": np.array([1.0, -2.0])}
    grads = {"p": np.zeros(2)}
    opt = Adam(params, grads, lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    expected = [
        [0.9000000019999999, -2.099999990000001],
        [0.9366103542405653, -2.199999980000001],
        [0.8946447927181044, -2.2999999700000022],
    ]
    for g, want in zip([[0.5, 0.1], [-1.0, 0.1], [2.0, 0.1]], expected, strict=True):
        grads["p"][...] = g
        opt.step()
        np.testing.assert_allclose(params["p"], want, rtol=1e-12)
    assert opt.t == 3


def test_adam_updates_in_place_and_round_trips_its_state():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 4)).astype(np.float32)
    params, grads = {"w": p}, {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    opt = Adam(params, grads, lr=1e-2)
    opt.step()
    assert params["w"] is p  # same buffer: the model's arrays are updated in place
    state = opt.state_dict()

    clone_params = {"w": p.copy()}
    clone = Adam(clone_params, grads, lr=5.0)
    clone.load_state_dict(state)
    assert clone.lr == pytest.approx(1e-2) and clone.t == 1
    opt.step()
    clone.step()
    np.testing.assert_array_equal(params["w"], clone_params["w"])


def test_adam_refuses_a_bad_learning_rate():
    with pytest.raises(ValueError, match="learning rate"):
        Adam({"w": np.zeros(1)}, {"w": np.zeros(1)}, lr=0)
