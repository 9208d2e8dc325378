"""DICOM images read the way radiology software shows them (``read_dicom``), through pydicom.

pydicom and the decoders of compressed pixel data are the optional extra ``minunet[dicom]``
(imported only when a DICOM file is read). From stored values to 8-bit grey, in the order of the
DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2):

1. the first frame (a multi-frame file is read by its first frame, with a warning);
2. the Modality LUT: Rescale Slope/Intercept, or the Modality LUT Sequence (pydicom's ``apply_modality_lut``);
3. the VOI: the VOI LUT Sequence when there is one (its output scaled by its entries' range), else the
   first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), else a robust range:
   the 0.5th-99.5th percentiles of the values, so that collimation borders and burned-in text do
   not flatten the lungs into a few grey levels;
4. polarity: MONOCHROME1 (0 is white) or a Presentation LUT Shape INVERSE is inverted, so that bone
   is bright. A DX file says MONOCHROME1 and INVERSE together (PS3.3 C.8.11.7: INVERSE "shall be
   used if" MONOCHROME1), so the two are one inversion, never two;
5. 0..1 -> 0..255, rounded.

8-bit colour DICOM (RGB, YBR) is converted to grey as a colour PNG is. A lateral view (View
Position LL or RL, or a View Code that says lateral) is read with a warning: the models are trained
on frontal views. A DICOM file without pixel data (a report, a presentation state) is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from minunet.errors import DataError, MinunetWarning

PREAMBLE_AT = 128  # a DICOM file (PS3.10 7.1): 128 bytes of preamble, then 'DICM', then the file meta
PERCENTILES = (0.5, 99.5)  # the robust range of an image without a window
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL")  # View Position (0018,5101): LL and RL are the defined terms
EXTRA = "pip install 'minunet[dicom]'"


def has_preamble(path) -> bool:
    """True when the file carries 'DICM' at byte 128 (False for a file that cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE_AT + 4)
    except OSError:
        return False
    return head[PREAMBLE_AT:] == b"DICM"


def looks_like_dicom(path) -> bool:
    """A ``.dcm`` file, or a file without an extension (or with a numeric one, as DICOM files named by
    their UID, 1.2.840.113619.2.55..., have) that carries the DICOM preamble."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return True
    return (suffix == "" or suffix[1:].isdigit()) and has_preamble(path)


def _bare_dataset(path: Path) -> bool:
    """A .dcm file without preamble (older writers) that starts with a file-meta or identifying group
    tag, (0002,xxxx) or (0008,xxxx), little-endian: worth reading as a bare data set."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and int.from_bytes(head, "little") in (0x0002, 0x0008)


def _dataset(path: Path):
    """The pydicom Dataset of ``path``; DataError when pydicom is missing or the file is not DICOM."""
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{path} is a DICOM file, and reading DICOM needs pydicom: {EXTRA}") from None
    try:
        if has_preamble(path):
            return pydicom.dcmread(path)
        if not _bare_dataset(path):
            raise DataError(f"{path} is not a DICOM file (no 'DICM' at byte 128): replace or remove the file")
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist: check the path") from None
    except DataError:
        raise
    except Exception as e:  # pydicom raises many kinds for a damaged file (struct.error, KeyError, EOFError...)
        raise DataError(f"cannot read DICOM file {path} ({type(e).__name__}): replace or remove the file") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: its encoding is what pydicom found
        implicit, _ = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else \
            pydicom.uid.ExplicitVRLittleEndian
    return ds


def _first_frame(ds, path: Path) -> np.ndarray:
    """The decoded pixel values of the first frame (warned about when there are more)."""
    from pydicom.pixels import pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None else ""
        raise DataError(f"DICOM file {path}{kind} holds no image (no pixel data): pass the X-ray image files")
    frames = int(ds.get("NumberOfFrames") or 1)
    ts = ds.file_meta.TransferSyntaxUID
    try:
        arr = pixel_array(ds, index=0)
    except Exception as e:  # pydicom: a decoder missing (RuntimeError), damaged or unsupported data (ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = f": the decoders come with {EXTRA}" if "missing" in str(e) and "dependenc" in str(e) else \
            ": replace the file or convert it to uncompressed DICOM or PNG"
        raise DataError(f"cannot decode the pixel data of DICOM file {path} ({ts.name}: {first}){hint}") from None
    if frames > 1:
        warnings.warn(f"{path} holds {frames} frames: reading the first", MinunetWarning, stacklevel=1)
    return arr


def _is_lateral(ds) -> bool:
    if str(ds.get("ViewPosition", "")).strip().upper() in LATERAL_VIEWS:
        return True
    return any("lateral" in str(item.get("CodeMeaning", "")).lower() for item in ds.get("ViewCodeSequence", []))


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """Values -> 0..1 through a window (PS3.3 C.11.2.1.2-3); None for a width the function cannot use.

    LINEAR (the default): 0 up to c - 0.5 - (w-1)/2, 1 above c - 0.5 + (w-1)/2, linear between;
    LINEAR_EXACT: (x - c) / w + 0.5, clipped; SIGMOID: 1 / (1 + exp(-4 (x - c) / w))."""
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - center) / width)) if width > 0 else None
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0, 1) if width > 0 else None
    if width < 1:
        return None
    if width == 1:  # a threshold at c - 0.5
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def _first(value) -> float | None:
    """The first value of a DS element that may list several (Window Center/Width); None when empty."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    return None if value in (None, "") else float(value)


def _voi(x: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """(values of interest 0..1, how they were chosen): the VOI LUT, the first window or the robust range."""
    from pydicom.pixels import apply_voi

    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        entries, first = item.LUTDescriptor[0] or 2**16, item.LUTDescriptor[1]
        # the LUT's output range is its entries' range: well-formed LUTs run 0 .. 2**bits-1, and this also
        # reads the files whose descriptor misstates the bits (12-bit entries declared as 16)
        lut = apply_voi(np.arange(first, first + entries), ds).astype(np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        y = apply_voi(np.rint(x).astype(np.int64), ds).astype(np.float64)
        return (np.zeros_like(y) if hi == lo else (y - lo) / (hi - lo)), "VOI LUT"
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        y = _window(x, center, width, function)
        if y is not None:
            return y, "window"
    lo, hi = np.percentile(x, PERCENTILES)
    if hi == lo:
        lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros_like(x), "one value"
    return np.clip((x - lo) / (hi - lo), 0, 1), f"{PERCENTILES[0]:g}-{PERCENTILES[1]:g}th percentile range"


def read_dicom(path) -> tuple[np.ndarray, str]:
    """(8-bit grey (H, W) uint8 array, note) of a DICOM file, read as the module docstring says; the note
    says how, e.g. 'DICOM (window)' or 'DICOM (MONOCHROME1, VOI LUT)'."""
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = _dataset(path)
    arr = _first_frame(ds, path)
    if _is_lateral(ds):
        warnings.warn(f"{path} is a lateral view (View Position {ds.get('ViewPosition', '?')}): the models are "
                      "trained on frontal (PA/AP) chest X-rays, so expect a poor segmentation", MinunetWarning,
                      stacklevel=1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:  # RGB (pydicom converts YBR)
            from PIL import Image

            return np.asarray(Image.fromarray(arr).convert("L"), dtype=np.uint8).copy(), "DICOM (colour to grey)"
        raise DataError(f"DICOM file {path} is {photometric} with {ds.get('BitsStored', '?')} bits: only grey "
                        "(MONOCHROME1/2) and 8-bit colour images can be read; convert it to MONOCHROME2")
    try:
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if not np.isfinite(x).all():
            raise DataError(f"DICOM file {path} holds NaN or inf values: replace or remove the file")
        y, how = _voi(x, ds)
    except DataError:
        raise
    except Exception as e:  # a malformed LUT or window: pydicom raises ValueError, NotImplementedError, struct.error...
        raise DataError(f"DICOM file {path} has a Modality LUT, VOI LUT or window that cannot be applied "
                        f"({type(e).__name__}: {e}): fix or remove the file") from None
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    inverted = photometric == "MONOCHROME1" or shape == "INVERSE"
    if inverted:
        y = 1 - y
    note = ("MONOCHROME1, " if photometric == "MONOCHROME1" else "inverted, " if inverted else "") + how
    return np.rint(y * 255).astype(np.uint8), f"DICOM ({note})"
