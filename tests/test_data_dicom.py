"""DICOM: grayscale pipeline round trips, a pydicom reference file, PHI scan, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import xray
from diffmem.data import read_dicom, scan_dicom_phi, write_dicom
from diffmem.errors import ConfigError, DataError


@pytest.mark.parametrize("kwargs, tol", [
    (dict(), 0.5 / 4095 + 1e-6),
    (dict(photometric="MONOCHROME1"), 0.5 / 4095 + 1e-6),
    (dict(photometric="MONOCHROME1", window=(1500, 2000), rescale=(2.0, -1024.0)),
     0.5 * 2.0 / 1999 + 1e-6),
    (dict(photometric="MONOCHROME2", window=(40.5, 300.25), rescale=(0.25, -200.0), bits=16),
     0.5 * 0.25 / 299.25 + 1e-6),
    (dict(photometric="MONOCHROME1", bits=8), 0.5 / 255 + 1e-6),
])
def test_round_trip(tmp_path, kwargs, tol):
    x = np.random.default_rng(0).random((12, 20))
    x[0, 0], x[0, 1] = 0.0, 1.0
    path = write_dicom(tmp_path / "x.dcm", x, **kwargs)
    y, header = read_dicom(path)
    assert y.dtype == np.float32 and y.shape == (12, 20)
    assert np.abs(y - x).max() <= tol
    assert header["photometric"] == kwargs.get("photometric", "MONOCHROME2")
    assert header["voi"] == ("window" if "window" in kwargs else "none")
    assert "PatientName" not in header and "patient" not in str(header).lower()


def test_monochrome1_and_window_are_really_stored(tmp_path):
    """The file holds inverted, rescaled values; only the full pipeline gives x back."""
    x = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    path = write_dicom(tmp_path / "m1.dcm", x, photometric="MONOCHROME1", window=(1500, 2000),
                       rescale=(2.0, -1024.0))
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
    assert float(ds.WindowCenter) == 1500 and float(ds.RescaleSlope) == 2.0
    stored = ds.pixel_array.astype(float)
    assert stored[0, 0] > stored[-1, -1]  # bright (x=1) is stored low for MONOCHROME1
    # hand-computed: x=0 -> shown 1 -> rescaled 1500 - .5 + 999.5 = 2499 -> stored 1761.5 -> 1762
    assert stored[0, 0] == 1762


def test_voi_lut_sequence_is_used_and_scaled_by_its_range(tmp_path):
    x = np.linspace(0, 1, 64).reshape(8, 8)
    path = write_dicom(tmp_path / "lut.dcm", x, bits=8)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 16])
    item.add_new("LUTData", "US", [1000 + 2 * i for i in range(256)])  # range 1000..1510
    ds.VOILUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    y, header = read_dicom(path)
    assert header["voi"] == "lut" and header["output_range"] == [1000.0, 1510.0]
    np.testing.assert_allclose(y, np.rint(x * 255) / 255, atol=1e-6)


def test_pydicom_reference_file_offline():
    path = get_testdata_file("CT_small.dcm")
    # shipped inside the pydicom package: a local file, nothing downloaded
    assert path is not None and Path(path).is_file()
    assert Path(path).resolve().is_relative_to(Path(pydicom.__file__).resolve().parent)
    arr, header = read_dicom(path)
    ref = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert arr.shape == ref.shape == (128, 128)
    # no window: the 16-bit signed range after rescale (-1024) maps onto [0, 1]
    assert header["voi"] == "none" and header["rescale"] == [1.0, -1024.0]
    expected = (ref - 1024 + 32768 + 1024) / 65535
    np.testing.assert_allclose(arr, expected, atol=1e-6)
    mr = get_testdata_file("MR_small.dcm")
    windowed, h2 = read_dicom(mr)
    assert h2["window"] == [600.0, 1600.0] and h2["voi"] == "window"
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window, written out by hand
    raw = pydicom.dcmread(mr).pixel_array.astype(np.float64)
    expected = np.clip((raw - (600 - 0.5)) / (1600 - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(windowed, expected, atol=1e-6)


def test_phi_scan_finds_planted_identifiers_and_private_tags(tmp_path):
    clean = write_dicom(tmp_path / "a" / "clean.dcm", xray(0, (8, 8)))
    assert scan_dicom_phi(clean) == []  # type-2 elements present but empty
    write_dicom(tmp_path / "a" / "b" / "phi.dcm", xray(1, (8, 8)),
                phi={"PatientName": "Doe^Jane", "PatientID": "12345678",
                     "InstitutionName": "General Hospital", "StudyDate": "21800506",
                     "AccessionNumber": "A1", "BurnedInAnnotation": "YES"},
                private={0x10: "MRN 12345678"})
    findings = scan_dicom_phi(tmp_path / "a")
    by_keyword = {f.keyword: f for f in findings}
    assert set(by_keyword) == {"PatientName", "PatientID", "InstitutionName", "StudyDate",
                               "AccessionNumber", "BurnedInAnnotation", "private"}
    assert by_keyword["PatientName"].value == "Doe^Jane"
    assert by_keyword["PatientName"].tag == "(0010,0010)"
    assert by_keyword["private"].to_dict() == {"file": str(tmp_path / "a" / "b" / "phi.dcm"),
                                               "tag": "(0011,1010)", "keyword": "private",
                                               "value": "MRN 12345678"}
    ref = scan_dicom_phi(get_testdata_file("CT_small.dcm"))
    assert {"PatientName", "private"} <= {f.keyword for f in ref}
    with pytest.raises(DataError, match="no such file or folder"):
        scan_dicom_phi(tmp_path / "missing")


def test_corrupt_truncated_and_non_image_dicom(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", xray(0, (32, 32)))
    data = good.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[: len(data) - 500])
    with pytest.raises(DataError, match=r"trunc\.dcm: .*(truncated|corrupt)"):
        read_dicom(tmp_path / "trunc.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"NOPE" + b"garbage" * 20)
    with pytest.raises(DataError, match=r"junk\.dcm: not a DICOM file"):
        read_dicom(tmp_path / "junk.dcm")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"sr\.dcm: DICOM file has no pixel data \(Basic Text SR"):
        read_dicom(tmp_path / "sr.dcm")


def test_writer_validates(tmp_path):
    x = np.zeros((4, 4))
    with pytest.raises(DataError, match=r"values in \[0, 1\]"):
        write_dicom(tmp_path / "a.dcm", x + 2)
    with pytest.raises(DataError, match="2-D"):
        write_dicom(tmp_path / "a.dcm", np.zeros((2, 2, 2)))
    with pytest.raises(ConfigError, match="photometric"):
        write_dicom(tmp_path / "a.dcm", x, photometric="RGB")
    with pytest.raises(ConfigError, match="bits must be"):
        write_dicom(tmp_path / "a.dcm", x, bits=17)
    with pytest.raises(ConfigError, match="not a DICOM keyword"):
        write_dicom(tmp_path / "a.dcm", x, phi={"PatientNom": "x"})
    with pytest.raises(ConfigError, match=r"window \(4000, 1000\) spans .* raise bits"):
        write_dicom(tmp_path / "a.dcm", x, window=(4000, 1000), bits=12)
    assert not (tmp_path / "a.dcm").exists()
