"""Images in, model-ready tensors out.

`preprocess` is the official inference transform, operation for operation: `convert("RGB")` (no EXIF
rotation, alpha dropped), PIL bilinear resize to S x S (aspect not kept; PIL's bilinear filter widens its
support when shrinking, i.e. it antialiases), `/255`, ImageNet mean/std. It reproduces torchvision's
`Resize((S, S))`, `ToTensor()`, `Normalize(...)` exactly on PIL images.

`FastPreprocessor` is the fleet's batched path: JPEGs are decoded with PIL's `draft()` (DCT-domain
down-scaling to the smallest power-of-two reduction still >= S), the uint8 pixels are stacked per batch
and resized with `torch.nn.functional.interpolate(bilinear, antialias=True)` on the model's device.
It is not bit-identical: see README "Preprocessing" for the measured difference.

`load_image` turns bytes into a PIL image under size and pixel limits, and names what is wrong with
anything that is not a usable image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ramplus_core.errors import CorruptImageError, ImageTooLargeError, NotAnImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes checked without decoding them: what the header says, within the limits."""

    data: bytes
    format: str  # PIL's name for it: JPEG, PNG, WEBP, ...
    mode: str  # the header's colour mode: RGB (a YCbCr JPEG), L, CMYK, P, RGBA, ...
    width: int
    height: int
    name: str


def inspect_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> EncodedImage:
    """Format and size from the header only (PIL opens lazily), the byte and pixel limits applied: a
    decompression bomb is refused here, before anything is decoded."""
    label = name or "image bytes"
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{label}: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data:
        raise NotAnImageError(f"{label}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, (width, height) = image.format or "", image.mode, image.size
    except Image.DecompressionBombError as exc:  # PIL's own guard fires at open for absurd canvases
        raise ImageTooLargeError(f"{label}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(f"{label}: not an image (unrecognised format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(f"{label}: corrupt image header ({exc})") from exc
    # Checked before decoding: a small file can claim a huge canvas (decompression bomb).
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{label}: {width}x{height} pixels exceeds the {max_pixels}-pixel limit")
    return EncodedImage(data, fmt, mode, width, height, label)


def load_image(
    source: bytes | str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image fully (so truncation shows here, not in the model), within the limits given."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image bytes")
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CorruptImageError(f"{label}: cannot read ({exc.strerror or exc})") from exc
        if size > max_bytes:
            raise ImageTooLargeError(f"{label}: {size} bytes exceeds the {max_bytes}-byte limit")
        data = path.read_bytes()
    else:
        data = source
    return open_image(inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=label))


def open_image(checked: EncodedImage, *, jpeg_draft: int | None = None) -> Image.Image:
    """Decode checked bytes fully (so truncation shows here, not in the model). With `jpeg_draft=S`, a JPEG
    is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers S x S: fewer pixels to decode."""
    image = Image.open(io.BytesIO(checked.data))
    try:
        if jpeg_draft is not None and image.format == "JPEG":
            image.draft("RGB", (jpeg_draft, jpeg_draft))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"{checked.name}: corrupt or truncated {image.format or 'image'} data ({exc})") from exc
    return image


def decodable_on_device(image: EncodedImage) -> bool:
    """What the batched JPEG decoder takes (`decode_jpegs`): a JPEG in colour or grey. CMYK and the other
    formats are decoded by PIL (`load_image`)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


# torchvision 0.29 deprecates its image codecs in favour of torchcodec (a later move); the GPU machines run
# torchvision 0.26, where decode_jpeg is the supported batched nvJPEG entry point. Said once, here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)


def decode_jpegs(images: Sequence[EncodedImage], device: str | torch.device) -> list[torch.Tensor | Exception]:
    """uint8 [3, h, w] per JPEG on `device`, decoded as one batch (nvJPEG on CUDA, libjpeg-turbo on the CPU).
    If the batch fails, image by image: one bad image costs only itself (its entry is the exception)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    encoded = [torch.frombuffer(bytearray(im.data), dtype=torch.uint8) for im in images]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - which image it was is found below
        results: list[torch.Tensor | Exception] = []
        for data in encoded:
            try:
                results.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception as exc:  # noqa: BLE001 - reported per image by the caller
                results.append(exc)
        return results


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """In place, for [3, H, W] or [B, 3, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def pil_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """One image through the official transform: [3, S, S] float32."""
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
    return _normalize(pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255))


def preprocess(images: Sequence[Image.Image] | Image.Image, image_size: int = 384) -> torch.Tensor:
    """PIL images -> [B, 3, S, S], identical to the official inference transform."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    return torch.stack([pil_to_tensor(im, image_size) for im in images])


class FastPreprocessor:
    """Batched decode + resize for throughput; close to, not identical with, `preprocess`."""

    def __init__(self, image_size: int = 384, device: str | torch.device = "cpu", *, use_draft: bool = True) -> None:
        self.image_size = image_size
        self.device = torch.device(device)
        self.use_draft = use_draft

    def decode(self, image: Image.Image) -> torch.Tensor:
        """A lazily opened PIL image -> uint8 [3, h, w], JPEGs reduced in the DCT domain first (on an image
        already loaded, `draft` can do nothing: decode bytes with `open_image(..., jpeg_draft=S)` instead)."""
        if self.use_draft and image.format == "JPEG":
            image.draft("RGB", (self.image_size, self.image_size))
        image = image.convert("RGB")
        w, h = image.size
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
        return pixels.permute(2, 0, 1)

    def resize(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, h_i, w_i] images of any sizes -> normalised float [B, 3, S, S] on the device."""
        s = self.image_size
        out = torch.empty(len(pixels), 3, s, s, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault(tuple(p.shape[1:]), []).append(i)
        # Same-sized images (the common case in a stream) are resized in one call.
        for _, index in by_size.items():
            batch = torch.stack([pixels[i] for i in index])
            if self.device.type == "cuda" and batch.device.type == "cpu":
                batch = batch.pin_memory()  # an asynchronous upload needs page-locked memory
            batch = batch.to(self.device, non_blocking=True).float()
            resized = F.interpolate(batch, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            out[index] = resized.round_().clamp_(0, 255).div_(255)
        return _normalize(out)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.resize([self.decode(im) for im in images])

