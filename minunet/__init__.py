"""minunet: a U-Net for medical image segmentation, written from scratch."""

__version__ = "0.1.0"

from minunet.model import UNet  # noqa: E402

__all__ = ["UNet", "__version__"]
