"""Images: decoding under limits with clear errors, the official transform, the fast batched path."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from helpers import jpeg_bytes, random_images
from official_reference import official_transform
from ramplus_core import CorruptImageError, FastPreprocessor, ImageTooLargeError, NotAnImageError, load_image, preprocess


def test_decodes_a_jpeg_completely():
    image = load_image(jpeg_bytes(random_images(1)[0]))
    assert image.size == (80, 96)


def test_truncated_jpeg_is_named_corrupt():
    data = jpeg_bytes(random_images(1, size=(200, 200))[0])
    with pytest.raises(CorruptImageError, match="corrupt or truncated JPEG"):
        load_image(data[: len(data) // 2], name="half.jpg")


def test_garbage_after_a_jpeg_header_is_corrupt():
    data = jpeg_bytes(random_images(1, size=(64, 64))[0])
    broken = data[:200] + bytes(range(256)) * 8 + data[-2:]
    with pytest.raises(CorruptImageError):
        load_image(broken)


def test_text_is_not_an_image():
    with pytest.raises(NotAnImageError, match="not an image"):
        load_image(b"id,uri\n1,s3://bucket/x.jpg\n")


def test_empty_file_is_not_an_image(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(NotAnImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_too_many_bytes():
    with pytest.raises(ImageTooLargeError, match="byte limit"):
        load_image(jpeg_bytes(random_images(1)[0]), max_bytes=100)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb, refused before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="50000x50000 pixels|2500000000 pixels"):
        load_image(_png_header_claiming(50_000, 50_000))


def test_unreadable_path(tmp_path):
    with pytest.raises(CorruptImageError, match="cannot read"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_every_mode_matches_the_official_transform(mode):
    image = random_images(1, size=(77, 131))[0].convert(mode)
    torch.testing.assert_close(preprocess([image], 384), official_transform([image], 384), atol=1e-5, rtol=0)


def test_fast_path_is_close_to_the_official_transform():
    photos = random_images(4, seed=3, size=(480, 640))
    official = preprocess(photos, 384)
    decoded = [Image.open(io.BytesIO(jpeg_bytes(p, quality=95))) for p in photos]
    reference = preprocess([Image.open(io.BytesIO(jpeg_bytes(p, quality=95))) for p in photos], 384)
    fast = FastPreprocessor(384, use_draft=False)(decoded)
    assert fast.shape == official.shape
    # Same decoded pixels, resized by torch instead of PIL: within about one 8-bit level on average.
    diff = (fast - reference).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.2
    # draft() decodes JPEGs at reduced DCT scale: still close for the model.
    drafted = FastPreprocessor(384, use_draft=True)([Image.open(io.BytesIO(jpeg_bytes(p, quality=95))) for p in photos])
    assert (drafted - reference).abs().mean() < 0.05


def test_configured_pixel_limit():
    with pytest.raises(ImageTooLargeError, match="80x96 pixels exceeds the 1000-pixel limit"):
        load_image(jpeg_bytes(random_images(1)[0]), max_pixels=1000)
