"""Clinical inputs: DICOM read as radiology software shows it, 16-bit PNG twins, through predict and quantify.

Every DICOM file is written by the test itself (pydicom), most of them from a shipped sample X-ray so
that the DICOM and its 8-bit PNG twin must give the same picture, hence the same mask."""

from __future__ import annotations

import csv
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_one_line_error, run
from test_data_reading import png16

from minunet.data import find_data, list_images, load_arrays, read_gray, read_image, read_mask
from minunet.errors import DataError, MinunetWarning

needs_pydicom = pytest.mark.skipif(importlib.util.find_spec("pydicom") is None,
                                   reason="writing test DICOM files needs pydicom: pip install 'minunet[dicom]'")
SAMPLE = Path(__file__).resolve().parent.parent / "minunet/assets/sample/Infection Segmentation Data/Train"
XRAY = SAMPLE / "COVID-19" / "images" / "covid_1.png"
TINY_RUN = ["--backend", "numpy", "--size", "32"]  # the shipped model at 32x32: the CLI path, not the mask


def sample_xray() -> np.ndarray:
    return np.asarray(Image.open(XRAY), dtype=np.uint8)


def write_dicom(path: Path, stored: np.ndarray, photometric="MONOCHROME2", bits=12, preamble=True, **attrs) -> Path:
    """A DX DICOM of ``stored`` (H, W), (F, H, W) frames or (H, W, 3) RGB, with the given attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    colour = stored.ndim == 3 and stored.shape[-1] == 3
    if stored.ndim == 3 and not colour:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-3:-1] if colour else stored.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = stored.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def twelve_bit(g: np.ndarray, monochrome1=False, path=None, **attrs):
    """The 12-bit DICOM whose rescale (slope 2, intercept -1024) and window give back the 8-bit picture g.

    Stored s = 8 g + 100, so rescaled m = 16 g - 824; the LINEAR window c = 1216.5, w = 4081 maps m
    to ((m - 1216) / 4080 + 0.5) = g / 255. MONOCHROME1 stores 4095 - s (m = 6966 - 16 g), whose window
    centre 4926.5 gives 1 - g / 255, inverted back to g / 255."""
    s = g.astype(np.int64) * 8 + 100
    if monochrome1:
        s, centre = 4095 - s, 4926.5
    else:
        centre = 1216.5
    return write_dicom(path, s, "MONOCHROME1" if monochrome1 else "MONOCHROME2", RescaleSlope=2,
                       RescaleIntercept=-1024, WindowCenter=centre, WindowWidth=4081, **attrs)


# --- reading rules ----------------------------------------------------------------------------------


@needs_pydicom
@pytest.mark.parametrize("monochrome1", [False, True])
def test_a_12_bit_dicom_with_rescale_and_window_reads_as_its_8_bit_png(tmp_path, monochrome1):
    g = sample_xray()
    path = twelve_bit(g, monochrome1, tmp_path / "x.dcm")
    img, note = read_image(path)
    assert img.dtype == np.uint8 and np.array_equal(img, g)
    assert note == ("DICOM (MONOCHROME1, window)" if monochrome1 else "DICOM (window)")


@needs_pydicom
def test_presentation_lut_shape_inverse_is_one_inversion(tmp_path):
    g = sample_xray()
    plain = read_gray(twelve_bit(g, path=tmp_path / "m2.dcm"))
    inverse = read_image(twelve_bit(g, path=tmp_path / "m2i.dcm", PresentationLUTShape="INVERSE"))
    assert np.array_equal(inverse[0], 255 - plain) and inverse[1] == "DICOM (inverted, window)"
    # a DX file states MONOCHROME1 and INVERSE together: one inversion, bone still bright
    m1 = read_gray(twelve_bit(g, True, tmp_path / "m1i.dcm", PresentationLUTShape="INVERSE"))
    assert np.array_equal(m1, plain)


@needs_pydicom
def test_without_a_window_a_robust_range_keeps_the_lungs_contrast(tmp_path):
    g = sample_xray()
    s = 1000 + 2 * g.astype(np.int64)  # the picture uses 511 of 4096 levels
    s[:, :1] = 0  # a collimation border: 0.4% of the pixels
    s[:1, :] = 4095  # burned-in text at the top of the range: 0.4%
    img, note = read_image(write_dicom(tmp_path / "x.dcm", s))
    assert note == "DICOM (0.5-99.5th percentile range)"
    inside = img[1:, 1:]
    assert int(inside.max()) - int(inside.min()) >= 250  # min-max would have squeezed it into 32 levels
    assert np.corrcoef(inside.ravel(), g[1:, 1:].ravel())[0, 1] > 0.99
    lo, hi = np.percentile(s, (0.5, 99.5))
    assert np.array_equal(img, np.rint(np.clip((s - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))


@needs_pydicom
def test_a_voi_lut_wins_over_the_window_and_is_scaled_by_its_entries(tmp_path):
    from pydicom.dataset import Dataset

    g = sample_xray()
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "US", [v // 16 * 16 for v in range(4096)])  # LUT Data: entries 0..4080, and
    # their own range (not 4095) is white
    img, note = read_image(write_dicom(tmp_path / "x.dcm", g.astype(np.int64) * 16, VOILUTSequence=[lut],
                                       WindowCenter=100, WindowWidth=10))
    assert note == "DICOM (VOI LUT)" and np.array_equal(img, g)


@needs_pydicom
def test_a_voi_lut_that_cannot_be_applied_is_one_line(tmp_path):
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 9]  # 9 bits per entry: not a depth the standard allows (8, 10-16)
    lut.add_new(0x00283006, "US", list(range(256)))
    path = write_dicom(tmp_path / "x.dcm", sample_xray(), bits=8, VOILUTSequence=[lut])
    with pytest.raises(DataError, match=r"x\.dcm has a Modality LUT, VOI LUT or window that cannot be applied"):
        read_gray(path)
    assert_one_line_error(run("predict", path, "--out", tmp_path / "p", *TINY_RUN), "x.dcm", "VOI LUT")


@needs_pydicom
def test_a_modality_lut_sequence_is_applied_before_the_range(tmp_path):
    from pydicom.dataset import Dataset

    g = sample_xray()
    s = 1000 + 2 * g.astype(np.int64)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.LUTData = np.arange(4095, -1, -1, dtype="<u2").tobytes()  # v -> 4095 - v (as OW)
    via_lut = read_gray(write_dicom(tmp_path / "lut.dcm", s, ModalityLUTSequence=[lut]))
    assert np.array_equal(via_lut, read_gray(write_dicom(tmp_path / "flipped.dcm", 4095 - s)))
    assert not np.array_equal(via_lut, read_gray(write_dicom(tmp_path / "plain.dcm", s)))


@needs_pydicom
@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_pixel_data_reads_as_the_uncompressed_file(tmp_path, syntax):
    import pydicom
    from pydicom import uid

    g = sample_xray()
    path = twelve_bit(g, path=tmp_path / "x.dcm")
    ds = pydicom.dcmread(path)
    try:
        ds.compress(getattr(uid, syntax))
    except (RuntimeError, NotImplementedError) as e:  # no encoder here (JPEG 2000 needs pylibjpeg-openjpeg)
        pytest.skip(f"pydicom cannot encode {syntax} here: {e}")
    ds.save_as(tmp_path / "c.dcm")
    assert pydicom.dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == getattr(uid, syntax)
    assert np.array_equal(read_gray(tmp_path / "c.dcm"), g)


@needs_pydicom
def test_a_multi_frame_file_is_read_by_its_first_frame_with_a_warning(tmp_path):
    g = sample_xray()
    frames = np.stack([g, 255 - g, g // 2]).astype(np.int64)
    with pytest.warns(MinunetWarning, match=r"x\.dcm holds 3 frames: reading the first"):
        img = read_gray(write_dicom(tmp_path / "x.dcm", frames, bits=8, WindowCenter=128, WindowWidth=256))
    assert np.array_equal(img, g)


@needs_pydicom
def test_a_lateral_view_is_read_with_a_warning(tmp_path):
    g = sample_xray()
    with pytest.warns(MinunetWarning, match=r"lateral view \(View Position LL\)"):
        assert np.array_equal(read_gray(twelve_bit(g, path=tmp_path / "ll.dcm", ViewPosition="LL")), g)
    r = run("predict", tmp_path / "ll.dcm", "--out", tmp_path / "p", *TINY_RUN)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "ll.dcm is a lateral view" in lines[0], r.stderr
    with warnings.catch_warnings():  # a frontal view says nothing
        warnings.simplefilter("error")
        read_gray(twelve_bit(g, path=tmp_path / "pa.dcm", ViewPosition="PA"))


@needs_pydicom
def test_colour_dicom_is_converted_to_grey_as_a_colour_png(tmp_path):
    g = sample_xray()
    rgb = np.stack([g, np.roll(g, 3, 1), g // 2], -1)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    img, note = read_image(write_dicom(tmp_path / "x.dcm", rgb, "RGB", bits=8))
    assert note == "DICOM (colour to grey)" and np.array_equal(img, read_gray(tmp_path / "x.png"))


@needs_pydicom
def test_a_dicom_without_an_image_is_one_line(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"report\.dcm \(Basic Text SR Storage\) holds no image"):
        read_gray(tmp_path / "report.dcm")
    assert_one_line_error(run("predict", tmp_path / "report.dcm", "--out", tmp_path / "p", *TINY_RUN),
                          "report.dcm", "holds no image")


@needs_pydicom
def test_pixel_data_that_cannot_be_decoded_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import pydicom.pixels

    path = twelve_bit(sample_xray(), path=tmp_path / "x.dcm")

    def no_decoder(ds, index=None):
        raise RuntimeError("Unable to decompress 'JPEG Lossless' pixel data because all plugins are missing "
                           "dependencies:\n    gdcm - requires gdcm\n    pylibjpeg - requires pylibjpeg")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    with pytest.raises(DataError, match=r"x\.dcm .*missing dependencies.*minunet\[dicom\]"):
        read_gray(path)
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file" * 20)
    with pytest.raises(DataError, match=r"junk\.dcm is not a DICOM file"):
        read_gray(tmp_path / "junk.dcm")


def test_without_pydicom_a_dicom_file_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.dcm"
    path.write_bytes(bytes(128) + b"DICM" + bytes(64))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(DataError, match=r"x\.dcm is a DICOM file, and reading DICOM needs pydicom: "
                                        r"pip install 'minunet\[dicom\]'"):
        read_gray(path)
    assert_one_line_error(run("predict", path, "--out", tmp_path / "p", *TINY_RUN), "minunet[dicom]")


@needs_pydicom
def test_dicom_files_are_found_with_or_without_an_extension(tmp_path):
    g = sample_xray()
    d = tmp_path / "scans"
    twelve_bit(g, path=d / "a.DCM")
    twelve_bit(g, path=d / "IM0001")  # no extension: found by its preamble
    twelve_bit(g, path=d / "1.2.840.113619.2.55.3")  # named by its UID
    twelve_bit(g, path=d / "bare.dcm", preamble=False)  # an older writer: no preamble, read by its suffix
    (d / "README").write_text("not an image")
    (d / "notes.txt").write_text("not an image")
    found = [p.name for p in list_images(d)]
    assert found == ["1.2.840.113619.2.55.3", "IM0001", "a.DCM", "bare.dcm"], found
    for name in found:
        assert np.array_equal(read_gray(d / name), g), name


@needs_pydicom
def test_a_dicom_data_set_trains_and_its_reading_is_said(tmp_path):
    """A generic data set of DICOM images with PNG masks decodes (train's and evaluate's path); a DICOM mask
    is refused with the reason."""
    from minidata import make_generic

    make_generic(tmp_path / "d", n=3)
    for p in sorted((tmp_path / "d" / "images").iterdir()):
        twelve_bit(read_gray(p), monochrome1=p.name.endswith("1.png"), path=p.with_suffix(".dcm"))
        p.unlink()
    items = find_data(tmp_path / "d").items()
    assert [it.image.suffix for it in items] == [".dcm"] * 3 and all(it.mask.suffix == ".png" for it in items)
    arr = load_arrays(items, 40, cache_dir=None)
    assert arr.mask_stats.images == {"DICOM (window)": 2, "DICOM (MONOCHROME1, window)": 1}
    with pytest.raises(DataError, match=r"mask .*img 0\.dcm is a DICOM file: save each mask as a PNG"):
        read_mask(items[0].image)


# --- through the commands: the same mask as the PNG twin ---------------------------------------------


@needs_pydicom
def test_predict_gives_a_dicom_and_a_16_bit_png_the_masks_of_their_8_bit_twin(tmp_path):
    g = sample_xray()
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(g).save(d / "xray.png")
    twelve_bit(g, path=d / "xray_m2.dcm")
    twelve_bit(g, monochrome1=True, path=d / "xray_m1.dcm")
    png16(d / "xray16.png", g.astype(np.float64) * 257, sbit=16)  # the 16-bit round trip: 255 * 257 = 65535
    assert np.array_equal(read_gray(d / "xray16.png"), g)
    r = run("predict", d, "--out", tmp_path / "p", "--backend", "numpy")
    assert r.exit_code == 0, r.output
    out = tmp_path / "p"
    png_mask = np.asarray(Image.open(out / "xray_mask.png"))
    assert png_mask.shape == g.shape and 0.1 < (png_mask > 0).mean() < 0.6  # the shipped model finds lungs
    for twin in ("xray_m2", "xray_m1", "xray16"):
        assert np.array_equal(np.asarray(Image.open(out / f"{twin}_mask.png")), png_mask), twin
        assert np.array_equal(np.asarray(Image.open(out / f"{twin}_overlay.png")),
                              np.asarray(Image.open(out / "xray_overlay.png"))), twin


@needs_pydicom
def test_quantify_reads_a_dicom_as_its_png_twin(tmp_path):
    g = sample_xray()
    Image.fromarray(g).save(tmp_path / "xray.png")
    twelve_bit(g, monochrome1=True, path=tmp_path / "xray.dcm")
    model = Path(__file__).resolve().parent.parent / "minunet/assets/model/lung_unet.npz"
    rows = []
    for name in ("xray.png", "xray.dcm"):
        out = tmp_path / name.replace(".", "_")
        # the lung model stands in for the lesion model: the reading, not the lesions, is under test
        r = run("quantify", tmp_path / name, "--out", out, "--lung-model", model, "--infection-model", model,
                "--backend", "numpy")
        assert r.exit_code == 0, r.output
        with open(out / "quantify.csv") as fh:
            row = next(csv.DictReader(fh))
        row.pop("image")
        rows.append(row)
        assert (out / "xray_quantify.png").is_file()
    assert rows[0] == rows[1] and float(rows[0]["infected_percent"]) > 0, rows
