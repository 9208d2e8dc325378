"""The ``minunet`` command line (click)."""

from __future__ import annotations

import click

from minunet import __version__
from minunet.cli.bench import bench
from minunet.cli.errors import MinunetGroup
from minunet.cli.evaluate import evaluate_cmd
from minunet.cli.predict import predict_cmd
from minunet.cli.train import train_cmd


@click.group(cls=MinunetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minunet")
def main():
    """minunet: a from-scratch U-Net for medical image segmentation."""


main.add_command(train_cmd)
main.add_command(evaluate_cmd)
main.add_command(predict_cmd)
main.add_command(bench)


if __name__ == "__main__":
    main()
