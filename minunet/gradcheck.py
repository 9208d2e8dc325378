"""Finite-difference gradient checks, in float64.

Two checks, both with central differences  f'(x) ~ (f(x+h) - f(x-h)) / 2h:

- ``check_ops``: each op's backward is a vector-Jacobian product. With a random
  upstream gradient dy, the scalar L(x) = <f(x), dy> has gradient backward(dy),
  so every input element's derivative of L is compared (the cases of
  ``opcases.py`` at small shapes; ``check_case`` runs one case at any shape).
- ``check_network``: the whole U-Net with BCE loss. For each parameter tensor
  p, a random direction d ~ N(0, I) gives the directional derivative
  a = <grad_p L, d>, compared with n = (L(p + h d) - L(p - h d)) / 2h. One
  direction per tensor keeps the cost at two forward passes per tensor. The
  relative error is |a - n| / max(|a|, |n|, ||grad_p L||), since ||grad_p L||
  is the typical size of a random directional derivative.

For ops, the relative error is ``opcases.rel_err``: |a - n| / max(|a|, |n|) over
the whole tensor (infinity norms), so tiny gradient entries cannot blow it up. Max-pool and
ReLU have kinks: a perturbation that flips an argmax or a sign is a true
non-smoothness, not a bug. Random inputs keep the values distinct, and the
network check uses a small step (h = 1e-7): a deep stack of ReLUs and pools
has thousands of kinks, and at h = 1e-5 a random direction crosses one often
enough to show errors of 1e-3. At 1e-7 round-off (~1e-9 absolute) dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minunet.opcases import MAXPOOL, RELU, SIGMOID_BCE, UPCONV, WEIGHTED_SIGMOID_BCE, conv2d, rel_err


@dataclass
class CheckRow:
    name: str
    max_abs_err: float
    max_rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_err < self.tol)


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


# (case, dims): small non-square shapes with N >= 2 and C >= 2
OP_CHECKS = [
    (conv2d(3), dict(n=2, cin=3, cout=4, h=5, w=6)),
    (conv2d(3, relu=True), dict(n=2, cin=3, cout=4, h=5, w=6)),
    (conv2d(1), dict(n=2, cin=3, cout=4, h=5, w=6)),
    (RELU, dict(n=2, c=3, h=4, w=5)),
    (MAXPOOL, dict(n=2, c=3, h=4, w=6)),
    (UPCONV, dict(n=2, cin=3, cout=2, cs=3, h=3, w=4)),
    (SIGMOID_BCE, dict(n=2, h=3, w=5)),
    (WEIGHTED_SIGMOID_BCE, dict(n=2, h=3, w=5)),
]


def check_case(backend, case, inputs, upstream, h=1e-6, tol=1e-6):
    """One case's backward against central differences of <forward(inputs), upstream>. Returns CheckRows."""
    analytic = case.run(backend, inputs, upstream)[1]

    def loss():
        out = case.run(backend, inputs)[0]
        return sum(float(np.sum(out[k] * upstream[k])) for k in upstream)

    rows = []
    for arg, grad in analytic.items():
        numeric = numeric_gradient(loss, inputs[arg], h)
        rows.append(CheckRow(f"{case.name} d{arg}", float(np.max(np.abs(grad - numeric))), rel_err(grad, numeric), tol))
    return rows


def check_ops(backend, seed=0, h=1e-6, tol=1e-6):
    """Check every op's backward against central differences. Returns a list of CheckRow."""
    rng = np.random.default_rng(seed)
    rows = []
    for case, dims in OP_CHECKS:
        rows += check_case(backend, case, *case.make(rng, np.float64, **dims), h=h, tol=tol)
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
        # Floor: |<g, d>| for d ~ N(0, I) is typically ||g||, so a tensor whose
        # random directional derivative happens to be near zero is not judged
        # against that near-zero value.
        floor = float(np.linalg.norm(grads[name])) or 1e-30
        rows.append(CheckRow(name, abs(analytic - numeric), rel_err(analytic, numeric, floor), tol))
    return rows


def format_table(rows):
    """The check as a text table: name | max abs err | max rel err | ok."""
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'parameter':<{width}}  {'max abs err':>11}  {'max rel err':>11}  ok"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.max_abs_err:11.2e}  {r.max_rel_err:11.2e}  {'OK' if r.ok else 'NOT OK'}")
    return "\n".join(lines)
