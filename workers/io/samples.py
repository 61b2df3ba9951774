"""The real photos that ship with scikit-image (a cat, coffee, a rocket, ...): offline test and demo images."""

from __future__ import annotations

import io

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")


def sample_photos(quality: int = 92) -> dict[str, bytes]:
    """{name: JPEG bytes} of every photo in `SAMPLE_PHOTOS`; needs scikit-image (the `dev` extra)."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in SAMPLE_PHOTOS:
        # The motorcycle comes as a stereo pair (left, right, disparity); the left view is the photo.
        pixels = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buf, "JPEG", quality=quality)
        out[name] = buf.getvalue()
    return out
