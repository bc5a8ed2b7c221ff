"""read_image: modes, scaling, crop + resize, and refusal of truncated or corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import save_jpeg, xray
from diffmem.data import read_image, write_dicom
from diffmem.errors import ConfigError, DataError


def test_png_modes_scale_to_unit_range(tmp_path):
    gray = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "l.png")
    out = read_image(tmp_path / "l.png")
    assert out.dtype == np.float32 and out.shape == (16, 16)
    np.testing.assert_allclose(out, gray / 255.0, atol=1e-6)

    rgb = np.stack([gray] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png"), gray / 255.0, atol=1e-6)
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), gray / 255.0, atol=1e-6)


def test_16bit_png_scaled_by_code_range_not_image_max(tmp_path):
    arr = np.array([[0, 1000], [4095, 32768]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    with Image.open(tmp_path / "x16.png") as im:
        assert im.mode.startswith("I")
    out = read_image(tmp_path / "x16.png")
    np.testing.assert_allclose(out, arr / 65535.0, rtol=1e-6)
    assert out.max() < 0.6  # not stretched to 1


def test_resize_crops_the_centre_square_then_averages(tmp_path):
    arr = np.zeros((40, 60), np.uint8)
    arr[:, :10] = 255  # left band, cropped away (the square is columns 10..49)
    arr[:, 10:30] = 200
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = read_image(tmp_path / "wide.png", size=2)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[200 / 255, 0], [200 / 255, 0]], atol=1e-5)
    # enlarging works too and stays in range
    up = read_image(tmp_path / "wide.png", size=80)
    assert up.shape == (80, 80) and 0.0 <= up.min() and up.max() <= 1.0
    with pytest.raises(ConfigError, match="size must be a positive integer"):
        read_image(tmp_path / "wide.png", size=0)


def test_jpeg_draft_resize_matches_full_decode(tmp_path):
    big = np.kron(xray(3, (64, 64)), np.ones((8, 8)))  # 512 x 512, smooth
    path = save_jpeg(tmp_path / "big.jpg", big)
    fast = read_image(path, size=32)
    from diffmem.data.images import resize_square

    slow = resize_square(read_image(path), 32)
    assert fast.shape == (32, 32)
    assert np.abs(fast - slow).max() < 0.03


def test_truncated_jpeg_is_an_error(tmp_path):
    path = save_jpeg(tmp_path / "t.jpg", xray(1, (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.jpg: cannot decode image.*truncated.*on-error skip"):
        read_image(path)
    with pytest.raises(DataError, match=r"t\.jpg: cannot decode image"):
        read_image(path, size=8)  # the reduced (draft) decode still notices


def test_garbage_empty_and_missing_files(tmp_path):
    (tmp_path / "g.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=r"g\.jpg: not a readable image"):
        read_image(tmp_path / "g.jpg")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.png: not a readable image"):
        read_image(tmp_path / "e.png")
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        read_image(tmp_path / "nope.png")


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    path = save_jpeg(tmp_path / "ok.jpg", xray(2))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ConfigError, match="LOAD_TRUNCATED_IMAGES is True"):
        read_image(path)


def test_dicom_dispatch_by_suffix_and_by_preamble(tmp_path):
    x = xray(4, (24, 24))
    p = write_dicom(tmp_path / "a.dcm", x, bits=12)
    noext = tmp_path / "a_without_suffix"
    noext.write_bytes(p.read_bytes())
    for path in (p, noext):
        np.testing.assert_allclose(read_image(path), x, atol=1e-3)
    assert read_image(p, size=12).shape == (12, 12)
