"""Per-op table and full training step of the U-Net, as ``minunet bench`` (same library, same output).

Usage (from the repository root):
    python benchmarks/bench_step.py --backend numba            # default U-Net: base 16, depth 4, 8x1x256x256
    python benchmarks/bench_step.py --no-ops --repeats 9       # only the step (and PyTorch, when importable)
    python benchmarks/bench_step.py --json > result.json
    python benchmarks/bench_step.py --widths 16,32,64          # the step per width, each side in a fresh process
    python benchmarks/bench_step.py --inference                # the forward pass only, base 16, batch 8
Run it from a Python where PyTorch is importable to get the ratio to PyTorch's channels_last step.
"""

from __future__ import annotations

from minunet.cli.bench import bench

if __name__ == "__main__":
    bench(prog_name="bench_step.py")
