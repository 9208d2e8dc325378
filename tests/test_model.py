"""The whole U-Net: parameter names, shapes, gradients against finite differences, learning."""

import numpy as np
import pytest

from minunet import UNet
from minunet.footprint import cache_bytes
from minunet.gradcheck import check_network, format_table, randomize_biases
from minunet.losses import bce_with_logits
from minunet.optim import Adam


def test_param_names_and_layouts_follow_forward_order():
    m = UNet(in_channels=1, base_channels=4, depth=2, backend="numpy", seed=0)
    names = list(m.params)
    assert names == [
        "enc0.conv1.weight", "enc0.conv1.bias", "enc0.conv2.weight", "enc0.conv2.bias",
        "enc1.conv1.weight", "enc1.conv1.bias", "enc1.conv2.weight", "enc1.conv2.bias",
        "bottleneck.conv1.weight", "bottleneck.conv1.bias", "bottleneck.conv2.weight", "bottleneck.conv2.bias",
        "dec1.up.weight", "dec1.up.bias", "dec1.conv1.weight", "dec1.conv1.bias",
        "dec1.conv2.weight", "dec1.conv2.bias",
        "dec0.up.weight", "dec0.up.bias", "dec0.conv1.weight", "dec0.conv1.bias",
        "dec0.conv2.weight", "dec0.conv2.bias",
        "head.weight", "head.bias",
    ]  # fmt: skip
    assert list(m.grads) == names
    assert m.params["enc0.conv1.weight"].shape == (4, 1, 3, 3)  # Conv2d: Cout, Cin, k, k
    assert m.params["bottleneck.conv1.weight"].shape == (16, 8, 3, 3)
    assert m.params["dec1.up.weight"].shape == (16, 8, 2, 2)  # ConvTranspose2d: Cin, Cout, 2, 2
    assert m.params["dec1.conv1.weight"].shape == (8, 16, 3, 3)  # concat(skip 8, up 8)
    assert m.params["head.weight"].shape == (1, 4, 1, 1)
    assert all(p.dtype == np.float32 for p in m.params.values())


def test_default_model_size():
    m = UNet()
    assert (m.base_channels, m.depth, m.in_channels) == (16, 4, 1)
    # encoder 293,232 + bottleneck 885,248 + decoder 762,320 + head 17, counted by hand
    # from (Cin*k*k + 1) * Cout per conv and Cin*Cout*4 + Cout per up-conv
    assert m.num_params() == 1_940_817


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (UNet(base_channels=4, depth=2, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    assert not np.array_equal(a.params["enc0.conv1.weight"], c.params["enc0.conv1.weight"])


def test_forward_shape_and_dtype():
    m = UNet(base_channels=4, depth=3, seed=0)
    y = m.forward(np.zeros((2, 1, 16, 24), np.float32))
    assert y.shape == (2, 1, 16, 24) and y.dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 1, 20, 16), (1, 1, 16, 12), (1, 1, 0, 16)])
def test_size_not_divisible_is_a_clear_error(shape):
    m = UNet(base_channels=2, depth=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        m.forward(np.zeros(shape, np.float32))


def test_wrong_channels_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="input channel"):
        UNet(base_channels=2, depth=1).forward(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)
    with pytest.raises(ValueError, match="base_channels"):
        UNet(base_channels=2.5)


@pytest.mark.parametrize("depth,seed", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_network_gradients_match_finite_differences(depth, seed):
    m = UNet(in_channels=1, base_channels=3, depth=depth, dtype="float64", seed=seed)
    randomize_biases(m, seed)
    rng = np.random.default_rng(seed)
    h, w = 2 * 2**depth, 3 * 2**depth  # non-square
    x = rng.standard_normal((2, 1, h, w))
    y = (rng.random((2, 1, h, w)) > 0.5).astype(np.float64)
    rows = check_network(m, x, y)
    assert len(rows) == len(m.params)
    assert all(r.ok for r in rows), "\n" + format_table(rows)
    assert max(r.max_rel_err for r in rows) < 1e-6


def test_network_check_catches_a_missing_skip_gradient():
    """Drop the skip connection's gradient: the encoder's gradients must then fail the check."""

    class NoSkipGrad(UNet):
        def backward(self, dlogits):
            be = self.backend
            up_backward = be.upconv2x2_backward

            def no_skip_grad(dy, cache):
                dx, dw, db, dskip = up_backward(dy, cache)
                return dx, dw, db, 0 * dskip

            be.upconv2x2_backward = no_skip_grad
            try:
                super().backward(dlogits)
            finally:
                del be.upconv2x2_backward  # the instance attribute shadowed the class's method

    m = NoSkipGrad(base_channels=3, depth=2, dtype="float64", seed=0)
    randomize_biases(m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 12))
    y = (rng.random((2, 1, 8, 12)) > 0.5).astype(np.float64)
    bad = {r.name for r in check_network(m, x, y) if not r.ok}
    assert "enc0.conv1.weight" in bad and "head.weight" not in bad


def test_backward_accumulates_until_zero_grad():
    m = UNet(base_channels=2, depth=2, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8))
    y = (rng.random((2, 1, 8, 8)) > 0.5).astype(np.float64)
    m.zero_grad()
    m.backward(bce_with_logits(m.forward(x), y)[1])
    once = {n: g.copy() for n, g in m.grads.items()}
    m.backward(bce_with_logits(m.forward(x), y)[1])
    for n in once:
        np.testing.assert_allclose(m.grads[n], 2 * once[n], rtol=1e-12)
    m.zero_grad()
    assert all(not g.any() for g in m.grads.values())


def test_tiny_unet_overfits_one_batch():
    m = UNet(in_channels=1, base_channels=4, depth=2, seed=0)
    opt = Adam(m.params, m.grads, lr=1e-2, backend=m.backend)
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 16, 16)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, :, 4:12, 3:10] = 1.0  # a rectangle, the same in every image
    x += y  # visible in the input
    losses = []
    for _ in range(100):
        m.zero_grad()
        loss, dlogits = bce_with_logits(m.forward(x), y, backend=m.backend)
        m.backward(dlogits)
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] / 10, f"loss went {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_inference_forward_is_bitwise_the_training_forward_and_keeps_no_cache(backend):
    m = UNet(1, 4, 3, backend=backend, seed=0)
    randomize_biases(m, np.random.default_rng(1))
    x = np.random.default_rng(2).random((3, 1, 32, 40)).astype(np.float32)
    trained = m.forward(x)
    inferred = m.forward(x, train=False)
    assert inferred.dtype == trained.dtype and np.array_equal(inferred, trained)
    layers = [layer for _, layer in m.named_layers()] + m.pools
    assert all(layer.cache is None for layer in layers)  # the training forward's caches are gone too
    assert np.array_equal(m.predict_proba(x), m.backend.sigmoid(trained))


def test_inference_frees_activations_as_it_goes():
    """Traced by tracemalloc (numpy backend): an inference forward keeps nothing once it returns (and drops
    what a training forward kept), and its peak stays well under the training forward's, which holds every
    layer's input for the backward pass."""
    import tracemalloc

    m = UNet(1, 8, 3, backend="numpy", seed=0)
    x = np.random.default_rng(0).random((4, 1, 64, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        m.forward(x, train=False)
        kept_infer, peak_infer = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        m.forward(x)
        kept_train, peak_train = tracemalloc.get_traced_memory()
        m.forward(x, train=False)
        kept_after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept_train > 50 * x.nbytes  # every layer's input and output, for the backward pass
    assert kept_infer < 0.01 * kept_train and kept_after < 0.01 * kept_train
    assert peak_infer < 0.7 * peak_train, (peak_infer, peak_train)


def test_cache_bytes_counts_each_buffer_once():
    """After a training forward, cache_bytes holds each activation once, for the first op that keeps
    it: the input and the pooled maps (conv inputs), every 3x3 conv's ReLU output, the argmaxes and
    the decoder's concatenations, each counted with the encoder conv whose output is its skip part
    (that conv keeps the skip's copy in it as its ReLU mask); the parameters and the inputs shared
    with an earlier output add nothing."""
    N, H, W, C, D, f = 2, 16, 24, 4, 2, 8  # float64
    m = UNet(1, C, D, backend="numpy", dtype="float64", seed=0)
    m.forward(np.zeros((N, 1, H, W)))
    widths = [C * 2**i for i in range(D + 1)]
    px = [N * (H >> i) * (W >> i) for i in range(D + 1)]  # pixels per level
    x = px[0] * f + sum(widths[i] * px[i + 1] * f for i in range(D))  # input, pooled maps
    # ReLU outputs: per level the encoder's first conv (width), its second as the [skip | up]
    # concatenation (2 x width), the decoder's two convs (width each); the bottleneck's two
    y = sum(5 * widths[i] * px[i] * f for i in range(D)) + 2 * widths[D] * px[D] * f
    argmax = sum(widths[i] * px[i + 1] for i in range(D))
    got = cache_bytes(m)
    assert got == {"conv3x3.x": x, "conv3x3.y": y, "maxpool2x2.argmax": argmax, "total": x + y + argmax}
    m.forward(np.zeros((N, 1, H, W)), train=False)
    assert cache_bytes(m) == {"total": 0}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_backward_frees_every_cache_and_needs_a_new_forward(backend):
    m = UNet(1, 4, 2, backend=backend, dtype="float64", seed=0)
    x = np.random.default_rng(0).random((2, 1, 16, 16))
    m.backward(bce_with_logits(m.forward(x), (x > 0.5).astype(np.float64))[1])
    assert all(layer.cache is None for layer in [layer for _, layer in m.named_layers()] + m.pools)
    assert cache_bytes(m) == {"total": 0}
    with pytest.raises(RuntimeError, match="training forward first"):
        m.backward(np.ones((2, 1, 16, 16)))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_each_skip_is_held_once_for_the_backward(backend):
    """After a training forward, the encoder's last conv keeps its output (its ReLU mask) as the skip's
    channels of the decoder's [skip | up] buffer, not as an array of its own; the gradients are the
    same as from the output's own array (the values are equal)."""
    m = UNet(1, 4, 2, backend=backend, dtype="float64", seed=0)
    x = np.random.default_rng(1).random((2, 1, 16, 16))
    m.forward(x)
    for i in range(m.depth):
        y, buf = m.enc[i].conv2.cache.y, m.dec[i].conv1.cache.x
        assert y.base is buf or np.shares_memory(y, buf)
        assert y.shape[0] == buf.shape[0] and y.size * 2 == buf.size  # the skip's half of [skip | up]
    # the same gradients as when each encoder cache keeps the output's own array (a copy)
    grads = {}
    for keep_copy in (False, True):
        m.zero_grad()
        logits = m.forward(x)
        if keep_copy:
            for i in range(m.depth):
                m.enc[i].conv2.cache = m.enc[i].conv2.cache._replace(y=m.enc[i].conv2.cache.y.copy())
        _, dlogits = bce_with_logits(logits, (x > 0.5).astype(x.dtype))
        m.backward(dlogits)
        grads[keep_copy] = {k: g.copy() for k, g in m.grads.items()}
    for k in grads[False]:
        np.testing.assert_array_equal(grads[False][k], grads[True][k])
