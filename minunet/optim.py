"""Adam (Kingma & Ba, 2015), bias-corrected, as in torch.optim.Adam without weight decay."""

from __future__ import annotations

import numpy as np


class Adam:
    """Adam over ordered name -> array mappings (``model.params``, ``model.grads``).

    ``step()`` updates every parameter in place through the backend's fused
    ``adam_step`` op, so the same optimizer serves every backend.
    """

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, backend=None):
        if set(params) != set(grads):
            raise ValueError("params and grads must have the same names")
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.params, self.grads = params, grads
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        if backend is None:
            from minunet.kernels.numpy_ref import NumpyBackend

            backend = NumpyBackend(next(iter(params.values())).dtype if params else "float32")
        self.backend = backend
        xp = backend.xp
        self.m = {n: xp.zeros_like(p) for n, p in params.items()}
        self.v = {n: xp.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for name, p in self.params.items():
            self.backend.adam_step(p, self.grads[name], self.m[name], self.v[name], self.lr, b1, b2, self.eps, self.t)

    def state_dict(self):
        """Host (numpy) copies of the moments, the step count and the hyper-parameters."""
        to_host = self.backend.to_host
        return {
            "t": self.t,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "m": {n: np.array(to_host(a)) for n, a in self.m.items()},
            "v": {n: np.array(to_host(a)) for n, a in self.v.items()},
        }

    def load_state_dict(self, state):
        missing = set(self.params) - set(state["m"])
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[0]}")
        self.t = int(state["t"])
        self.lr = float(state["lr"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        for n in self.params:
            for mine, theirs in ((self.m, state["m"]), (self.v, state["v"])):
                if tuple(theirs[n].shape) != tuple(mine[n].shape):
                    raise ValueError(f"optimizer state for {n} has shape {theirs[n].shape}, expected {mine[n].shape}")
                mine[n][...] = self.backend.asarray(theirs[n], dtype=mine[n].dtype)


def cosine_lr(base_lr, step, total_steps, warmup_steps=0):
    """Learning rate at ``step`` (0-based) of a cosine schedule from base_lr down to 0.

    A linear warm-up over the first ``warmup_steps`` steps, then
    lr = base_lr * (1 + cos(pi * progress)) / 2 with progress from 0 to 1.
    A function of the step alone, so a resumed run follows the same curve.
    """
    if total_steps <= 0:
        return base_lr
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + float(np.cos(np.pi * progress)))
