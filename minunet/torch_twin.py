"""A PyTorch twin of minunet's U-Net: the yardstick for benchmarks and GPU checks.

PyTorch is never a dependency of minunet: this module imports torch inside its
functions and is only used by ``minunet bench`` (when torch is importable) and
``benchmarks/gpu_bench.py``. The twin has exactly the same layers,
``copy_weights`` gives it minunet's weights, parameter by parameter, and
``torch_stepper`` and ``torch_forward`` are the PyTorch sides of ``bench.minunet_stepper`` and
``bench.minunet_forward``.
"""

from __future__ import annotations


def torch_twin(in_channels, base, depth):
    """The same U-Net in PyTorch: parameter names map 1:1 (see ``copy_weights``)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def double(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

    class TorchUNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = [base * 2**i for i in range(depth + 1)]
            self.depth = depth
            self.enc = nn.ModuleList(double(in_channels if i == 0 else w[i - 1], w[i]) for i in range(depth))
            self.bottleneck = double(w[depth - 1], w[depth])
            self.ups = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(depth))
            self.dec = nn.ModuleList(double(2 * w[i], w[i]) for i in range(depth))
            self.head = nn.Conv2d(w[0], 1, 1)

        def forward(self, x):
            skips = []
            for i in range(self.depth):
                x = self.enc[i](x)
                skips.append(x)
                x = F.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for i in reversed(range(self.depth)):
                x = self.ups[i](x)
                x = self.dec[i](torch.cat([skips[i], x], dim=1))
            return self.head(x)

    return TorchUNet()


def torch_name(name):
    """minunet parameter name -> the twin's: enc2.conv1.weight -> enc.2.0.weight, dec1.up.bias -> ups.1.bias."""
    parts = name.split(".")
    block, leaf = parts[0], parts[-1]
    if block == "head":
        return f"head.{leaf}"
    idx = {"conv1": "0", "conv2": "2"}
    if block == "bottleneck":
        return f"bottleneck.{idx[parts[1]]}.{leaf}"
    kind, level = ("enc", block[3:]) if block.startswith("enc") else ("dec", block[3:])
    if parts[1] == "up":
        return f"ups.{level}.{leaf}"
    return f"{kind}.{level}.{idx[parts[1]]}.{leaf}"


def copy_weights(model, tmodel):
    import torch

    tparams = dict(tmodel.named_parameters())
    assert len(tparams) == len(model.params), (len(tparams), len(model.params))
    with torch.no_grad():
        for n, p in model.params.items():
            t = tparams[torch_name(n)]
            assert tuple(t.shape) == tuple(p.shape), (n, t.shape, p.shape)
            t.copy_(torch.as_tensor(model.backend.to_host(p), device=t.device))


def torch_stepper(tmodel, x, y, lr=1e-3, channels_last=False):
    """step() -> loss tensor: one PyTorch training step of ``tmodel`` on the batch (x, y),
    numpy arrays moved once to the model's device: zero_grad, forward, BCE with logits,
    backward, Adam. The gradients stay in ``.grad`` after the step."""
    import torch
    from torch.nn import functional as F

    device = next(tmodel.parameters()).device
    xt, yt = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    if channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(tmodel.parameters(), lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(tmodel(xt), yt)
        loss.backward()
        opt.step()
        return loss

    return step


def torch_forward(tmodel, x, channels_last=False):
    """forward() -> logits: PyTorch's inference forward of ``tmodel`` on x (numpy, moved once to the
    model's device), under ``torch.inference_mode()``: no autograd graph is recorded, so nothing is
    kept for a backward pass (the counterpart of minunet's ``forward(x, train=False)``)."""
    import torch

    device = next(tmodel.parameters()).device
    xt = torch.as_tensor(x, device=device)
    if channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    tmodel.eval()

    def forward():
        with torch.inference_mode():
            return tmodel(xt)

    return forward
