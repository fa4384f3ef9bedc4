"""Image decoding, the resize rule and MediaError for bad input (data_pipelines.preprocessing)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from data_pipelines.preprocessing import (MediaError, Preprocessing, decode_image_bytes, media_kind, probe_image,
                                          read_image_rgb, resize_image, scale_to_unit)


def _gradient_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)], axis=-1).astype(np.uint8)


def _write(path, image_bgr_or_gray, params=()) -> str:
    assert cv2.imwrite(str(path), image_bgr_or_gray, list(params))
    return str(path)


@pytest.mark.parametrize("extension", [".png", ".bmp", ".webp"])
def test_lossless_formats_decode_to_exact_rgb(tmp_path, extension):
    rgb = _gradient_rgb()
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if extension == ".webp" else []
    path = _write(tmp_path / f"image{extension}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    np.testing.assert_array_equal(read_image_rgb(path), rgb)


def test_jpeg_decodes_like_opencv_imread(tmp_path):
    rgb = _gradient_rgb()
    path = _write(tmp_path / "image.JPG", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image_rgb(path), cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB))


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment holding only the Orientation tag, as a phone writes it."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("orientation, upright", [(1, lambda im: im), (3, lambda im: im[::-1, ::-1]),
                                                  (6, lambda im: np.rot90(im, -1)), (8, lambda im: np.rot90(im))])
def test_exif_orientation_turns_phone_photos_upright(tmp_path, orientation, upright):
    stored = np.zeros((48, 96, 3), np.uint8)
    stored[:, :48] = 255  # left half white, as the sensor stored it
    stored[:8, :] = (0, 0, 200)  # a red top band, so every rotation and flip differs
    jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    path = tmp_path / "phone.jpg"
    path.write_bytes(_with_exif_orientation(jpeg, orientation))
    decoded = read_image_rgb(path)
    expected = upright(cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    assert decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


def test_gray_sixteen_bit_and_rgba_become_rgb_uint8(tmp_path):
    gray = _gradient_rgb()[:, :, 0]
    decoded = read_image_rgb(_write(tmp_path / "gray.png", gray))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[:, :, 1], gray)

    deep = (gray.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image_rgb(_write(tmp_path / "deep.png", deep))[:, :, 2], gray)
    deep_color = np.stack([deep, deep // 2, deep // 3], axis=-1)
    assert read_image_rgb(_write(tmp_path / "deep_color.png", deep_color)).dtype == np.uint8

    rgba = np.dstack([_gradient_rgb(), np.full((48, 64), 7, np.uint8)])
    decoded = read_image_rgb(_write(tmp_path / "rgba.png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)))
    np.testing.assert_array_equal(decoded, rgba[:, :, :3])


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_bad_input_raises_one_line_media_error(tmp_path):
    good = cv2.imencode(".jpg", _gradient_rgb())[1].tobytes()
    png = cv2.imencode(".png", _gradient_rgb())[1].tobytes()
    bad_files = {
        "empty.jpg": b"",
        "garbage.jpg": b"this is not an image\n" * 20,
        "truncated.jpg": good[: len(good) // 2],
        "truncated.png": png[: len(png) // 2],
        "text_named.png": b"hello",
        "huge_header.png": _png_header_only(50_000, 50_000),
    }
    for name, data in bad_files.items():
        path = tmp_path / name
        path.write_bytes(data)
        for reader in (read_image_rgb, probe_image):
            with pytest.raises(MediaError) as info:
                reader(path)
            message = str(info.value)
            assert "\n" not in message and name in message, message
    with pytest.raises(MediaError, match="megapixel"):
        decode_image_bytes(_png_header_only(50_000, 50_000), "huge")
    with pytest.raises(MediaError, match="cannot read"):
        read_image_rgb(tmp_path / "missing.jpg")


def test_a_png_named_jpg_still_decodes(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(cv2.imencode(".png", _gradient_rgb())[1].tobytes())
    assert read_image_rgb(path).shape == (48, 64, 3)


def test_model_input_is_nearest_exact_resize_over_255():
    rgb = _gradient_rgb(224, 224)
    model_input = scale_to_unit(resize_image(rgb, Preprocessing()))
    expected = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.float64) / 255.0
    assert model_input.dtype == np.float32 and model_input.shape == (256, 256, 3)
    np.testing.assert_allclose(model_input, expected, rtol=0, atol=1e-7)
    bilinear = scale_to_unit(resize_image(rgb, Preprocessing(resize="bilinear", image_size=64)))
    assert bilinear.shape == (64, 64, 3) and 0.0 <= bilinear.min() and bilinear.max() <= 1.0


def test_shared_test_image_matches_the_reference_recipe(shared_dir):
    path = shared_dir / "mesonet" / "test_images" / "real" / "real00240.jpg"
    expected = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (256, 256),
                          interpolation=cv2.INTER_NEAREST_EXACT) / 255.0
    np.testing.assert_allclose(scale_to_unit(resize_image(read_image_rgb(path), Preprocessing())), expected, atol=1e-7)


def test_preprocessing_round_trips_and_validates():
    prep = Preprocessing(resize="area", frames_per_video=8)
    assert Preprocessing.from_dict({**prep.to_dict(), "added_later": 1}) == prep
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(resize="cubic")
    with pytest.raises(ValueError, match="face_detector"):
        Preprocessing(face_detector="dnn")


def test_media_kind_by_extension():
    assert media_kind("a/B.JPEG") == "image" and media_kind("x.WebP") == "image"
    assert media_kind("clip.MKV") == "video" and media_kind("clip.webm") == "video"
    assert media_kind("notes.txt") is None and media_kind("noext") is None
