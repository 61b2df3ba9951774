"""JPEGs decoded with their batch on the model's device (issue 16): the same tags as PIL's path, one bad image
costs only itself, and a decompression bomb is refused from its header. Here the device is the CPU
(torchvision's decode_jpeg runs libjpeg-turbo there; on CUDA it is nvJPEG, measured by bench/bench_gpu_serving.py)."""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import zlib

import pytest
import torch
from PIL import Image

from fakes import LocalSource, MemoryDeadLetters, MemorySink
from helpers import jpeg_bytes, make_tiny_model, random_images
from ramplus_core.preprocess import EncodedImage
from ramplus_core.synthetic import generate
from workers.errors import ErrorKind, InputError
from workers.schemas import TagRequest
from workers.stream.engine import ImageDecoder, TaggingEngine
from workers.stream.pipeline import StreamPipeline

# Two decoders (PIL's libjpeg and torchvision's libjpeg-turbo build) may differ in IDCT and upsampling:
# a few levels per pixel, which moves a score by far less than this.
SCORE_TOLERANCE = 0.02
# The fleet's CPU path also decodes JPEGs at a reduced DCT scale (draft); nvJPEG decodes at full size and the
# batched resize does the rest, so the two see slightly different pixels: a stated, looser bound.
DRAFT_SCORE_TOLERANCE = 0.05


def engines(**kw):
    model = make_tiny_model(num_tags=24)
    return (TaggingEngine(model, device="cpu", decode="cpu", threshold=0.0, **kw),
            TaggingEngine(make_tiny_model(num_tags=24), device="cpu", decode="gpu", threshold=0.0, **kw))


def encoded(image: Image.Image, fmt: str = "JPEG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def test_the_device_path_tags_like_the_pil_path_on_photos_and_scenes():
    skimage = pytest.importorskip("skimage")  # noqa: F841 - the dev extra has it
    from workers.io.samples import sample_photos

    blobs = list(sample_photos().values())[:6] + [jpeg_bytes(s.image) for s in generate(6, seed=4, size=160)]
    on_cpu, on_device = engines()
    deferred = [on_device.decode(b, f"img{i}") for i, b in enumerate(blobs)]
    assert all(isinstance(d, EncodedImage) for d in deferred)  # checked in the fetch thread, decoded with the batch
    device = on_device.infer(deferred)
    with_draft = worst_score_difference(on_cpu.infer([on_cpu.decode(b, f"img{i}") for i, b in enumerate(blobs)]), device)
    on_cpu.decoder.fast.use_draft = False  # the same pixel count: what differs is only the JPEG decoder
    decoder_only = worst_score_difference(on_cpu.infer([on_cpu.decode(b, f"img{i}") for i, b in enumerate(blobs)]), device)
    assert decoder_only < SCORE_TOLERANCE, decoder_only
    assert with_draft < DRAFT_SCORE_TOLERANCE, with_draft


def worst_score_difference(first, second) -> float:
    worst = 0.0
    for a, b in zip(first, second, strict=True):
        assert sorted(a.names) == sorted(b.names)  # threshold 0: every tag, with its score
        sa, sb = dict(zip(a.names, a.values)), dict(zip(b.names, b.values))
        worst = max(worst, max(abs(sa[t] - sb[t]) for t in sa))
    return worst


def test_a_batch_with_bad_images_tags_the_good_ones_and_names_each_bad_ones_kind():
    good = random_images(3, seed=5, size=(120, 160))
    whole = jpeg_bytes(good[0])
    blobs = {
        "good": whole,
        "truncated": whole[: len(whole) // 2],  # a sound header: only decoding finds it
        "corrupt": whole[:2] + b"\x00" * 64,  # SOI and then nothing a decoder can read
        "cmyk": encoded(good[1].convert("CMYK")),  # PIL decodes it; torchvision's batch does not take it
        "progressive": encoded(good[2], quality=85, progressive=True),
        "png": encoded(good[1], "PNG"),
        "grey": encoded(good[2].convert("L")),
    }
    _, on_device = engines()
    decoded, refused = [], {}
    for name, data in blobs.items():
        try:
            decoded.append((name, on_device.decode(data, name)))
        except InputError as exc:
            refused[name] = exc.kind
    results = dict(zip([n for n, _ in decoded], on_device.infer([d for _, d in decoded])))
    for name, result in results.items():
        if isinstance(result, InputError):
            refused[name] = result.kind
    # the corrupt one is refused from its header in the fetch thread, the truncated one with its batch
    assert refused == {"truncated": ErrorKind.DECODE, "corrupt": ErrorKind.NOT_IMAGE}
    assert {n for n, r in results.items() if not isinstance(r, InputError)} == {"good", "cmyk", "progressive", "png", "grey"}
    assert all(len(results[n].names) == 24 for n in ("good", "cmyk", "progressive", "png", "grey"))


def test_through_the_pipeline_the_bad_ones_are_dead_lettered_and_every_offset_committed():
    image = random_images(1, seed=6, size=(120, 160))[0]
    whole = jpeg_bytes(image)
    objects = {"s3://b/good.jpg": whole, "s3://b/cut.jpg": whole[: len(whole) // 3], "s3://b/p.png": encoded(image, "PNG")}
    items = [TagRequest(id=f"{k}-{i}", uri=f"s3://b/{k}") for i in range(3) for k in ("good.jpg", "cut.jpg", "p.png")]

    class Fetcher:
        def fetch(self, uri: str) -> bytes:
            return objects[uri]

    source, sink, dead = LocalSource(items, max_poll_records=8), MemorySink(), MemoryDeadLetters()
    engine = TaggingEngine(make_tiny_model(), device="cpu", decode="gpu")
    pipeline = StreamPipeline(source, sink, dead, engine, Fetcher(), worker="t", batch_size=4, max_batch_wait_s=0.01)
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert sorted(r.id for r in sink.results) == sorted(i.id for i in items if "cut" not in i.id)
    assert sorted((d.id, d.error.kind) for d in dead.letters) == [(f"cut.jpg-{i}", ErrorKind.DECODE) for i in range(3)]
    assert source.committed == {("local", 0): len(items)}


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(jpeg_bytes(random_images(1, size=(16, 16))[0]))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("make", [png_header, jpeg_claiming], ids=["png", "jpeg"])
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_a_50000_square_header_is_refused_before_any_decoding(make, decode):
    bomb = make(50_000, 50_000)
    assert len(bomb) < 2_000
    engine = TaggingEngine(make_tiny_model(), device="cpu", decode=decode, max_pixels=40_000_000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InputError) as refused:
            engine.decode(bomb, "bomb")
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # PIL's own bomb guard or our pixel limit, whichever is lower, fires at the header
    assert refused.value.kind == ErrorKind.TOO_LARGE and "pixels" in str(refused.value)
    # 2.5 Gpx decoded would take gigabytes and seconds; the header alone takes neither
    assert seconds < 0.5 and peak < 5 * 2**20, (seconds, peak)


def test_decode_setting_is_checked_and_auto_stays_on_pil_without_cuda():
    with pytest.raises(ValueError, match="auto, cpu or gpu"):
        TaggingEngine(make_tiny_model(), device="cpu", decode="nvjpeg")
    assert not TaggingEngine(make_tiny_model(), device="cpu").decode_on_device
    assert not TaggingEngine(make_tiny_model(), device="cpu", decode="gpu", fast=False).decode_on_device  # exact path: PIL
    assert isinstance(TaggingEngine(make_tiny_model(), device="cpu").decode(jpeg_bytes(random_images(1)[0]), "x"), torch.Tensor)


def test_the_fleet_cpu_path_decodes_jpegs_at_a_reduced_dct_scale():
    """draft() must come before the decode: a 1024x768 JPEG for a 384 model decodes at half scale (512x384)."""
    data = jpeg_bytes(random_images(1, size=(768, 1024), seed=3)[0])
    pixels = ImageDecoder(384, fast=True).decode(data, "big.jpg")
    assert tuple(pixels.shape) == (3, 384, 512)
    full = ImageDecoder(384, fast=True)
    full.fast.use_draft = False
    assert tuple(full.decode(data, "big.jpg").shape) == (3, 768, 1024)


def test_where_jpegs_are_decoded_follows_the_setting():
    from workers.stream.engine import defers_jpegs

    assert defers_jpegs("auto", fast=True, on_cuda=True) and not defers_jpegs("auto", fast=True, on_cuda=False)
    assert defers_jpegs("gpu", fast=True, on_cuda=False)  # torchvision's decoder on the CPU: the tested path
    assert not defers_jpegs("gpu", fast=False, on_cuda=True)  # the exact transform decodes with PIL
    assert not defers_jpegs("cpu", fast=True, on_cuda=True)
    with pytest.raises(ValueError, match="auto, cpu or gpu"):
        defers_jpegs("nvjpeg", fast=True, on_cuda=True)
    decoder = ImageDecoder(64, defer_jpegs=True)
    image = random_images(1)[0]
    assert isinstance(decoder.decode(jpeg_bytes(image), "a.jpg"), EncodedImage)
    assert isinstance(decoder.decode(encoded(image, "PNG"), "a.png"), torch.Tensor)
    assert isinstance(decoder.decode(encoded(image.convert("CMYK"), "JPEG"), "cmyk.jpg"), torch.Tensor)
    with pytest.raises(ValueError, match="fast path"):
        ImageDecoder(64, fast=False, defer_jpegs=True)
