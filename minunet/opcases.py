"""One table of op cases, and the one relative error every checker uses.

Every op of the backend interface is described once, as an ``OpCase``: a
name, an input maker, a forward and a backward. Four harnesses run the same
cases:

- ``minunet gradcheck`` (``gradcheck.py``): a backward against central
  differences of its forward, in float64;
- ``minunet bench`` (``bench.py``) and ``benchmarks/gpu_bench.py``: a backend
  against the NumPy reference on a cropped shape, then timed at full size;
- ``tests/test_backend_equivalence.py``: every backend against the reference
  on shapes drawn by hypothesis.

A case's arrays are named: inputs (``x``, ``w``, ``b``, ...), outputs (``y``,
``loss``, ...), upstream gradients keyed by output name and gradients keyed by
input name. ``make`` draws NCHW numpy arrays (plus the few Python scalars an op
takes, which ride along unchanged). ``to_backend`` and ``to_host`` are the one
place where arrays cross into and out of a backend: the names in
``activations`` go through ``from_nchw`` / ``to_nchw`` (a backend may keep
activations NHWC), everything else through ``asarray`` / ``to_host``.
``forward`` and ``backward`` see backend arrays only, so a benchmark times
them without the conversions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from minunet.kernels.numpy_ref import NumpyBackend


def rel_err(a, b, floor=1e-30) -> float:
    """max|a - b| / max(max|a|, max|b|, floor): the distance of two tensors, relative to their scale.

    Why this form, for every comparison in minunet:
    - Relative to the tensor's largest value, not elementwise: a float32 sum
      leaves an absolute error of about eps times the size of its terms, so an
      entry that cancels to nearly zero carries a large elementwise relative
      error without anything being wrong. Against the scale, a tensor of 1e-6
      gradients is judged exactly as strictly as one of 1e3 activations.
    - Symmetric: neither side is "the truth". The same number serves backend
      vs reference and analytic vs finite differences.
    - ``floor`` bounds the denominator: the default only turns 0/0 (both
      tensors exactly zero) into 0; a caller that knows a natural scale passes
      it (the network gradient check passes ||grad||).
    Differing shapes give inf; a NaN or inf mismatch gives NaN, which fails
    every ``err <= tol``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), floor)
    return float(np.max(np.abs(a - b))) / scale


@dataclass(frozen=True)
class OpCase:
    """One op: ``make(rng, dtype, **dims) -> (inputs, upstream)`` (NCHW numpy),
    ``forward(be, inputs) -> (outputs, cache)``,
    ``backward(be, cache, upstream) -> grads`` (None: the op has no backward),
    ``flops(**dims) -> (forward, backward)`` for the benchmark's GFLOP/s, and
    ``well_posed(inputs, upstream) -> upstream`` (None: nothing to do), which the
    cross-backend checks apply before comparing gradients (see ``comparable``)."""

    name: str
    make: Callable
    forward: Callable
    backward: Callable | None = None
    activations: frozenset = frozenset()
    flops: Callable | None = None
    well_posed: Callable | None = None

    def comparable(self, inputs, upstream):
        """The upstream gradients with the entries zeroed where the op's gradient is not defined
        within rounding, so that two correct backends must agree on the rest.

        A fused ReLU's backward is dy * [z > 0]. Where the pre-activation z lies within float
        rounding of 0, two backends that sum in different orders may put it on either side of the
        kink, and their gradients then differ by a whole dy there (the left and right derivatives
        differ): that is no error of either. At the widths of the U-Net (pre-activations of size
        ~30 over ~500k pixels of a validation crop) that happens in about one draw in four. The
        timing never calls this; gradcheck does not need it (float64, tiny shapes)."""
        if self.well_posed is None or upstream is None:
            return upstream
        return self.well_posed(inputs, upstream)

    def to_backend(self, be, arrays):
        """NCHW numpy arrays -> be's arrays (copies: an op may update its inputs in place)."""
        def move(k, v):
            if not isinstance(v, np.ndarray):
                return v
            return be.from_nchw(v.copy()) if k in self.activations else be.asarray(v.copy())

        return {k: move(k, v) for k, v in arrays.items()}

    def to_host(self, be, arrays):
        """be's arrays -> NCHW numpy arrays; a Python float becomes a 0-d array, None stays None."""
        def move(k, v):
            if v is None:  # conv's dx when need_dx is False
                return None
            if isinstance(v, float):  # the loss
                return np.asarray(v)
            return np.asarray(be.to_host(be.to_nchw(v) if k in self.activations else v))

        return {k: move(k, v) for k, v in arrays.items()}

    def run(self, be, inputs, upstream=None):
        """Forward (and, given upstream gradients, backward) from and to NCHW host arrays:
        returns (outputs, grads); grads is {} without upstream or backward."""
        x = self.to_backend(be, inputs)
        out, cache = self.forward(be, x)
        grads = {}
        if upstream is not None and self.backward is not None:
            grads = self.to_host(be, self.backward(be, cache, self.to_backend(be, upstream)))
        return self.to_host(be, out), grads


def _normal(rng, dtype, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


_ACT = frozenset({"x", "y"})


@functools.cache  # one case object per option set: the benchmark counts ops by case
def conv2d(k=3, relu=False, need_dx=True):
    """3x3 (pad 1) or 1x1 convolution, optionally with the fused ReLU; dims n, cin, cout, h, w."""

    def make(rng, dtype, n, cin, cout, h, w):
        inputs = dict(x=_normal(rng, dtype, n, cin, h, w), w=_normal(rng, dtype, cout, cin, k, k),
                      b=_normal(rng, dtype, cout))
        return inputs, dict(y=_normal(rng, dtype, n, cout, h, w))

    def forward(be, i):
        return _out(be.conv2d_forward(i["x"], i["w"], i["b"], relu=relu))

    def backward(be, c, up):
        dx, dw, db = be.conv2d_backward(up["y"], c, need_dx=need_dx)
        return {"x": dx, "w": dw, "b": db}

    def flops(n, cin, cout, h, w):
        f = 2 * n * h * w * cin * cout * k * k  # a multiply-add is 2
        return f, f * (2 if need_dx else 1)  # backward: dw, and dx when asked

    name = f"conv2d {k}x{k}" + (" +relu" if relu else "") + ("" if need_dx else " (no dx)")
    return OpCase(name, make, forward, backward, _ACT, flops, _off_the_kink if relu else None)


# A float32 sum of K terms differs between two summation orders by at most about K eps sum|terms|,
# typically sqrt(K) eps sum|terms|; this many eps of sum|terms| covers what the backends do.
KINK_EPS = 64


def _off_the_kink(inputs, upstream):
    """conv2d +relu: dy zeroed where |z| <= KINK_EPS * eps * (sum_{c,i,j} |w||xpad| + |b|), with the
    pre-activation z = conv(x, w) + b and the bound computed in float64 (the reference, relu off).
    Measured on a validation crop of the U-Net's 128->64 conv: 64 of 524,288 pixels at float32."""
    x, w, b = (np.asarray(inputs[k], np.float64) for k in ("x", "w", "b"))
    ref = NumpyBackend("float64")
    z = ref.conv2d_forward(x, w, b)[0]
    bound = ref.conv2d_forward(np.abs(x), np.abs(w), np.abs(b))[0]
    dy = upstream["y"]
    near = np.abs(z) <= KINK_EPS * np.finfo(dy.dtype).eps * bound
    return dict(upstream, y=np.where(near, 0, dy).astype(dy.dtype))


def _out(result, name="y"):
    """A backend's (out, cache) -> ({name: out}, cache)."""
    out, c = result
    return {name: out}, c


def _make_relu(rng, dtype, n, c, h, w):
    return dict(x=_normal(rng, dtype, n, c, h, w)), dict(y=_normal(rng, dtype, n, c, h, w))


def _make_pool(rng, dtype, n, c, h, w):
    """dims n, c, h, w (h, w even); standard normal values are distinct, so no window ties."""
    return dict(x=_normal(rng, dtype, n, c, h, w)), dict(y=_normal(rng, dtype, n, c, h // 2, w // 2))


RELU = OpCase(
    "relu",
    _make_relu,
    lambda be, i: _out(be.relu_forward(i["x"])),
    lambda be, c, up: {"x": be.relu_backward(up["y"], c)},
    _ACT,
)

MAXPOOL = OpCase(
    "maxpool2x2",
    _make_pool,
    lambda be, i: _out(be.maxpool2x2_forward(i["x"])),
    lambda be, c, up: {"x": be.maxpool2x2_backward(up["y"], c)},
    _ACT,
)


def _make_upconv(rng, dtype, n, cin, cout, cs, h, w):
    """dims: the input's n, cin, h, w, the output's cout (the output is 2h x 2w) and the skip's cs channels."""
    inputs = dict(x=_normal(rng, dtype, n, cin, h, w), w=_normal(rng, dtype, cin, cout, 2, 2),
                  b=_normal(rng, dtype, cout), skip=_normal(rng, dtype, n, cs, 2 * h, 2 * w))
    return inputs, dict(y=_normal(rng, dtype, n, cs + cout, 2 * h, 2 * w))


UPCONV = OpCase(  # the decoder's up-conv, written after the skip: y = [skip | up-conv(x)]
    "upconv2x2 +skip",
    _make_upconv,
    lambda be, i: _out(be.upconv2x2_forward(i["x"], i["w"], i["b"], i["skip"])),
    lambda be, c, up: dict(zip(("x", "w", "b", "skip"), be.upconv2x2_backward(up["y"], c), strict=True)),
    frozenset({"x", "skip", "y"}),
    lambda n, cin, cout, cs, h, w: (8 * n * h * w * cin * cout, 16 * n * h * w * cin * cout),
)


def _make_logits(rng, dtype, n, h, w):
    """Logits z (N,1,H,W) spread over both tails, binary targets y, and d loss = 1 (so backward is dz)."""
    z = _normal(rng, dtype, n, 1, h, w, scale=3.0)
    return dict(z=z, y=(rng.random(z.shape) > 0.5).astype(dtype)), dict(loss=1.0)


SIGMOID = OpCase("sigmoid", _make_logits, lambda be, i: ({"s": be.sigmoid(i["z"])}, None))

SIGMOID_BCE = OpCase(  # fused: the forward computes the loss and dz; the backward only scales dz
    "sigmoid+bce",
    _make_logits,
    lambda be, i: _out(be.sigmoid_bce(i["z"], i["y"]), "loss"),  # the cache is dz
    lambda be, dz, up: {"z": up["loss"] * dz},
)


def _make_weighted_logits(rng, dtype, n, h, w):
    """As ``_make_logits``, plus pixel weights in [0, 4) (some exactly 0, some 1) for the weighted loss."""
    inputs, upstream = _make_logits(rng, dtype, n, h, w)
    weights = (4 * rng.random(inputs["z"].shape)).astype(dtype)
    weights.flat[0] = 0  # a pixel that does not count
    if weights.size > 1:
        weights.flat[1] = 1
    return dict(inputs, w=weights), upstream


WEIGHTED_SIGMOID_BCE = OpCase(  # the same fused kernel with a weight per pixel (``--lesion-weight``); dz only
    "sigmoid+bce weighted",
    _make_weighted_logits,
    lambda be, i: _out(be.sigmoid_bce(i["z"], i["y"], i["w"]), "loss"),
    lambda be, dz, up: {"z": up["loss"] * dz},
)


def _make_adam(rng, dtype, size):
    """One parameter tensor of ``size`` values, its gradient, zero moments, lr and the step t."""
    p, g = _normal(rng, dtype, size), _normal(rng, dtype, size)
    return dict(p=p, g=g, m=np.zeros_like(p), v=np.zeros_like(p), lr=1e-3, t=1), {}


def _adam_forward(be, i):
    be.adam_step(i["p"], i["g"], i["m"], i["v"], i["lr"], 0.9, 0.999, 1e-8, i["t"])
    return {"p": i["p"], "m": i["m"], "v": i["v"]}, None


ADAM = OpCase("adam", _make_adam, _adam_forward)  # in place on p, m, v: the "outputs" are those
