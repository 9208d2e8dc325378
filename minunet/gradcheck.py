"""Finite-difference gradient checks, in float64.

Two checks, both with central differences  f'(x) ~ (f(x+h) - f(x-h)) / 2h:

- ``check_ops``: each op's backward is a vector-Jacobian product. With a random
  upstream gradient dy, the scalar L(x) = <f(x), dy> has gradient backward(dy),
  so every input element's derivative of L is compared (small shapes).
- ``check_network``: the whole U-Net with BCE loss. For each parameter tensor
  p, a random direction d ~ N(0, I) gives the directional derivative
  a = <grad_p L, d>, compared with n = (L(p + h d) - L(p - h d)) / 2h. One
  direction per tensor keeps the cost at two forward passes per tensor. The
  relative error is |a - n| / max(|a|, |n|, ||grad_p L||), since ||grad_p L||
  is the typical size of a random directional derivative.

For ops, the relative error is |a - n| / max(|a|, |n|) taken over the whole
tensor (infinity norms), so tiny gradient entries cannot blow it up. Max-pool and
ReLU have kinks: a perturbation that flips an argmax or a sign is a true
non-smoothness, not a bug. Random inputs keep the values distinct, and the
network check uses a small step (h = 1e-7): a deep stack of ReLUs and pools
has thousands of kinks, and at h = 1e-5 a random direction crosses one often
enough to show errors of 1e-3. At 1e-7 round-off (~1e-9 absolute) dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CheckRow:
    name: str
    max_abs_err: float
    max_rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_err < self.tol)


def _rel(a, n):
    a, n = np.asarray(a, np.float64), np.asarray(n, np.float64)
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(n))))
    abs_err = float(np.max(np.abs(a - n)))
    return abs_err, (abs_err / scale if scale > 0 else abs_err)


def numeric_gradient(f, x, h=1e-6):
    """d f / d x for a scalar function f of array x, element by element (x is restored)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + h
        fp = f()
        flat[k] = old - h
        fm = f()
        flat[k] = old
        gflat[k] = (fp - fm) / (2 * h)
    return grad


def _op_cases(backend, rng):
    """Yield (op name, inputs dict, forward(inputs) -> out, backward(inputs, dy) -> grads dict)."""
    be = backend
    to_be, to_np = be.from_nchw, lambda a: np.asarray(be.to_host(be.to_nchw(a)), np.float64)
    par = lambda a: be.asarray(a, np.float64)  # noqa: E731
    host = lambda a: np.asarray(be.to_host(a), np.float64)  # noqa: E731

    def conv_case(k, relu):
        inputs = {
            "x": rng.standard_normal((2, 3, 5, 6)),
            "w": rng.standard_normal((4, 3, k, k)),
            "b": rng.standard_normal(4),
        }

        def fwd(i):
            return to_np(be.conv2d_forward(to_be(i["x"]), par(i["w"]), par(i["b"]), relu=relu)[0])

        def bwd(i, dy):
            _, cache = be.conv2d_forward(to_be(i["x"]), par(i["w"]), par(i["b"]), relu=relu)
            dx, dw, db = be.conv2d_backward(to_be(dy), cache)
            return {"x": to_np(dx), "w": host(dw), "b": host(db)}

        return fwd, bwd, inputs

    for k, relu in ((3, False), (3, True), (1, False)):
        fwd, bwd, inputs = conv_case(k, relu)
        yield f"conv2d {k}x{k}" + (" +relu" if relu else ""), inputs, fwd, bwd

    yield (
        "relu",
        {"x": rng.standard_normal((2, 3, 4, 5))},
        lambda i: to_np(be.relu_forward(to_be(i["x"]))[0]),
        lambda i, dy: {"x": to_np(be.relu_backward(to_be(dy), be.relu_forward(to_be(i["x"]))[1]))},
    )
    yield (
        "maxpool2x2",
        {"x": rng.standard_normal((2, 3, 4, 6))},
        lambda i: to_np(be.maxpool2x2_forward(to_be(i["x"]))[0]),
        lambda i, dy: {"x": to_np(be.maxpool2x2_backward(to_be(dy), be.maxpool2x2_forward(to_be(i["x"]))[1]))},
    )

    def up_bwd(i, dy):
        _, cache = be.upconv2x2_forward(to_be(i["x"]), par(i["w"]), par(i["b"]))
        dx, dw, db = be.upconv2x2_backward(to_be(dy), cache)
        return {"x": to_np(dx), "w": host(dw), "b": host(db)}

    yield (
        "upconv2x2",
        {"x": rng.standard_normal((2, 3, 3, 4)), "w": rng.standard_normal((3, 2, 2, 2)), "b": rng.standard_normal(2)},
        lambda i: to_np(be.upconv2x2_forward(to_be(i["x"]), par(i["w"]), par(i["b"]))[0]),
        up_bwd,
    )

    target = be.asarray((rng.random((2, 1, 3, 5)) > 0.5).astype(np.float64), np.float64)
    bce = lambda i: be.sigmoid_bce(be.asarray(i["z"], np.float64), target)  # noqa: E731
    yield (
        "sigmoid+bce",
        {"z": 3 * rng.standard_normal((2, 1, 3, 5))},
        lambda i: np.array(bce(i)[0]),
        lambda i, dy: {"z": float(dy) * host(bce(i)[1])},
    )


def check_ops(backend, seed=0, h=1e-6, tol=1e-6):
    """Check every op's backward against central differences. Returns a list of CheckRow."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, inputs, fwd, bwd in _op_cases(backend, rng):
        out = fwd(inputs)
        dy = rng.standard_normal(out.shape)
        analytic = bwd(inputs, dy)
        for arg, x in inputs.items():
            numeric = numeric_gradient(lambda: float(np.sum(fwd(inputs) * dy)), x, h)  # noqa: B023 (called here)
            abs_err, rel_err = _rel(analytic[arg], numeric)
            rows.append(CheckRow(f"{name} d{arg}", abs_err, rel_err, tol))
    return rows


def randomize_biases(model, seed=0, scale=0.1):
    """Give every bias a small random value, in place.

    A fresh model has zero biases, so a conv whose whole receptive field is
    zero (a dead ReLU region upstream) outputs exactly 0: the ReLU kink itself,
    where the one-sided difference quotients disagree. That is not a bug of
    the backward pass, but it upsets a finite-difference check, so the check
    moves the biases off zero first.
    """
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if name.endswith(".bias"):
            p[...] = model.backend.asarray(rng.normal(0.0, scale, p.shape))


def network_loss_and_grads(model, x, y):
    """Forward, BCE loss, backward. Returns the loss; fills model.grads."""
    be = model.backend
    model.zero_grad()
    loss, dlogits = be.sigmoid_bce(model.forward(x), y)
    model.backward(dlogits)
    return loss


def check_network(model, x, y, seed=0, h=1e-7, tol=1e-6):
    """Directional-derivative check of every parameter tensor of a float64 model."""
    if model.dtype != "float64":
        raise ValueError("the gradient check needs a float64 model (finite differences in float32 are noise)")
    be = model.backend
    rng = np.random.default_rng(seed)
    x, y = be.asarray(x), be.asarray(y)
    network_loss_and_grads(model, x, y)
    grads = {n: np.asarray(be.to_host(g), np.float64).copy() for n, g in model.grads.items()}
    rows = []
    for name, p in model.params.items():
        d = rng.standard_normal(p.shape)
        analytic = float(np.sum(grads[name] * d))
        original = p.copy()
        p[...] = original + h * be.asarray(d)
        lp = be.sigmoid_bce(model.forward(x), y)[0]
        p[...] = original - h * be.asarray(d)
        lm = be.sigmoid_bce(model.forward(x), y)[0]
        p[...] = original
        numeric = (lp - lm) / (2 * h)
        # Scale: |<g, d>| for d ~ N(0, I) is typically ||g||, so a tensor whose
        # random directional derivative happens to be near zero is not judged
        # against that near-zero value.
        abs_err = abs(analytic - numeric)
        scale = max(abs(analytic), abs(numeric), float(np.linalg.norm(grads[name])))
        rel_err = abs_err / scale if scale > 0 else abs_err
        rows.append(CheckRow(name, abs_err, rel_err, tol))
    return rows


def format_table(rows):
    """The check as a text table: name | max abs err | max rel err | ok."""
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'parameter':<{width}}  {'max abs err':>11}  {'max rel err':>11}  ok"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.max_abs_err:11.2e}  {r.max_rel_err:11.2e}  {'OK' if r.ok else 'NOT OK'}")
    return "\n".join(lines)
