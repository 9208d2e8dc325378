"""The ``minunet`` command line (click)."""

from __future__ import annotations

import click

from minunet import __version__, heap
from minunet.cli.bench import bench
from minunet.cli.errors import MinunetGroup
from minunet.cli.evaluate import evaluate_cmd
from minunet.cli.export import export_cmd
from minunet.cli.gradcheck import gradcheck_cmd
from minunet.cli.predict import predict_cmd
from minunet.cli.quantify import quantify_cmd
from minunet.cli.summary import summary_cmd
from minunet.cli.train import train_cmd


@click.group(cls=MinunetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minunet")
def main():
    """minunet: a from-scratch U-Net for medical image segmentation.

    \b
    Examples:
      minunet train --out runs/sample          train on the shipped 150-image sample
      minunet train DATA --epochs 5 --out runs/lung; minunet train --resume --out runs/lung
      minunet evaluate DATA --model runs/lung/best.npz --json
      minunet predict xray.png --out pred/ --keep-largest 2
      minunet quantify xray.png --out quant/   lesion share of each lung, extent score (not for diagnosis)
      minunet export runs/lung/best.npz lung_unet.npz   weights only, float16
      minunet summary --size 256               layer table: shapes, params, FLOPs, memory
      minunet gradcheck --backend numba        finite-difference check of every backward
      minunet bench --backend numba            time the kernels
    """
    heap.keep_freed_memory()  # each step reuses the last one's pages (minunet/heap.py)


main.add_command(train_cmd)
main.add_command(evaluate_cmd)
main.add_command(predict_cmd)
main.add_command(quantify_cmd)
main.add_command(summary_cmd)
main.add_command(gradcheck_cmd)
main.add_command(export_cmd)
main.add_command(bench)


if __name__ == "__main__":
    main()
