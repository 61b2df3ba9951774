"""The compression codecs a replica must read, checked before it joins the group.

Producers choose their codec (librdkafka, Java and Go clients default to none, but services often set
snappy, lz4 or zstd), and a broker or topic with `compression.type` recompresses whatever they send.
kafka-python decodes gzip itself and the others only through optional packages; without one, the first
batch in that codec raises inside `poll()`. So a replica round-trips every codec through kafka-python's
own functions at start, and refuses to start (one line, naming the package) rather than fail mid-stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import CodecUnavailable


@dataclass(frozen=True)
class Codec:
    name: str
    package: str  # what to install (pip name); empty when kafka-python needs nothing
    encode: str  # function names in kafka.codec
    decode: str


# Every codec of the Kafka record format (compression.type): none needs nothing; gzip is in the stdlib.
CODECS = (
    Codec("gzip", "", "gzip_encode", "gzip_decode"),
    Codec("snappy", "python-snappy", "snappy_encode", "snappy_decode"),
    Codec("lz4", "lz4", "lz4_encode", "lz4_decode"),
    Codec("zstd", "zstandard", "zstd_encode", "zstd_decode"),
)
# kafka-python's record parser asks these before decoding a batch (`_assert_has_codec`).
_AVAILABLE = {"gzip": "has_gzip", "snappy": "has_snappy", "lz4": "has_lz4", "zstd": "has_zstd"}
_SAMPLE = b'{"id": "codec-check", "uri": "s3://bucket/key.jpg"}' * 64


def codec_problem(codec: Codec) -> str | None:
    """Why kafka-python cannot read `codec` here, or None when a round trip gives the bytes back."""
    from kafka import codec as kafka_codec

    try:
        if not getattr(kafka_codec, _AVAILABLE[codec.name])():
            return "its library is not installed"
        encode, decode = getattr(kafka_codec, codec.encode), getattr(kafka_codec, codec.decode)
        if encode is None or decode is None:
            return "its library is not installed"
        if decode(encode(_SAMPLE)) != _SAMPLE:
            return "a round trip changed the bytes"
    except Exception as exc:  # a broken install shows up as anything: say what it was
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]  # one line, whatever the library said
    return None


def check_codecs(codecs: tuple[Codec, ...] = CODECS) -> list[str]:
    """The codec names this process reads; raises `CodecUnavailable` (one line) if any cannot be read."""
    for codec in codecs:
        problem = codec_problem(codec)
        if problem is not None:
            fix = f": install '{codec.package}' (pip install 'kafka-python[{codec.name}]')" if codec.package else ""
            raise CodecUnavailable(f"kafka-python cannot read {codec.name}-compressed Kafka batches ({problem}){fix}")
    return ["none", *(c.name for c in codecs)]
