"""Kafka's compression codecs: checked at start, and a batch that cannot be decoded recognised as such."""

from __future__ import annotations

import time

import kafka.codec
import pytest
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from workers.errors import CodecUnavailable
from workers.stream.fleet import start_failure
from workers.stream.kafka_codecs import CODECS, check_codecs
from workers.stream.kafka_io import is_decoding_error
from workers.settings import KafkaSettings, ModelSettings, Settings

# Kafka's compression.type ids in a record batch's attributes
CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
MISSING = {"snappy": ("has_snappy", "python-snappy"), "lz4": ("has_lz4", "lz4"), "zstd": ("has_zstd", "zstandard")}


def batch(codec: str, n: int = 5) -> bytes:
    builder = MemoryRecordsBuilder(magic=2, compression_type=CODEC_IDS[codec], batch_size=1 << 20)
    for i in range(n):
        builder.append(int(time.time() * 1000), key=f"k{i}".encode(), value=b'{"id": "x", "uri": "s3://b/k.jpg"}' * 4, headers=[])
    builder.close()
    return builder.buffer()


def read_all(data: bytes) -> list[bytes]:
    records = MemoryRecords(data)
    out = []
    while (b := records.next_batch()) is not None:
        out.extend(r.value for r in b)
    return out


def test_this_install_reads_every_codec_and_says_which():
    assert check_codecs() == ["none", "gzip", "snappy", "lz4", "zstd"]
    for codec in CODEC_IDS:  # and kafka-python's record reader agrees, on real batches
        assert len(read_all(batch(codec))) == 5


@pytest.mark.parametrize("codec", sorted(MISSING))
def test_a_missing_codec_library_is_one_line_naming_the_package(codec, monkeypatch):
    checker, package = MISSING[codec]
    monkeypatch.setattr(kafka.codec, checker, lambda: False)
    with pytest.raises(CodecUnavailable) as info:
        check_codecs()
    message = str(info.value)
    assert "\n" not in message and f"{codec}-compressed" in message and f"'{package}'" in message
    assert f"kafka-python[{codec}]" in message


def test_a_codec_that_garbles_its_round_trip_is_refused(monkeypatch):
    monkeypatch.setattr(kafka.codec, "zstd_decode", lambda data: b"garbled")
    with pytest.raises(CodecUnavailable, match="zstd-compressed Kafka batches \\(a round trip changed the bytes\\)"):
        check_codecs()


def test_a_codec_whose_library_raises_is_refused_with_what_it_raised(monkeypatch):
    def broken(_data):  # noqa: ANN001, ANN202
        raise OSError("libsnappy.so.1: cannot open shared object file\nsecond line")

    monkeypatch.setattr(kafka.codec, "snappy_decode", broken)
    with pytest.raises(CodecUnavailable) as info:
        check_codecs()
    message = str(info.value)
    assert "OSError: libsnappy.so.1: cannot open shared object file second line" in message and "\n" not in message
    assert "python-snappy" in message


def test_every_codec_of_the_record_format_is_checked():
    assert sorted(c.name for c in CODECS) == sorted(CODEC_IDS)


def test_a_replica_refuses_to_start_before_it_loads_anything(monkeypatch, tmp_path):
    from workers.stream.replica import Replica

    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: False)
    # A checkpoint that does not exist and a broker nobody runs: the codec check must come first.
    settings = Settings(model=ModelSettings(checkpoint=tmp_path / "missing"), kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    with pytest.raises(CodecUnavailable, match="lz4"):
        Replica(settings)


def test_serve_refuses_to_start_with_one_line_naming_the_package(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)
    monkeypatch.setenv("RAMPLUS_MODEL__CHECKPOINT", str(tmp_path))
    result = CliRunner().invoke(app, ["serve", "--no-create-topics"])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: kafka-python cannot read zstd-compressed") and "'zstandard'" in line


def test_an_error_raised_while_decoding_a_batch_is_told_from_any_other(monkeypatch):
    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: False)
    with pytest.raises(Exception) as decoding:
        read_all(batch("lz4"))
    assert type(decoding.value).__name__ == "UnsupportedCodecError" and is_decoding_error(decoding.value)
    corrupt = bytearray(batch("gzip"))
    corrupt[-8:] = b"\x00" * 8  # inside the gzip stream
    with pytest.raises(Exception) as garbled:
        read_all(bytes(corrupt))
    assert is_decoding_error(garbled.value)
    try:
        raise ValueError("anything else: a coordinator error, our own bug")
    except ValueError as exc:
        assert not is_decoding_error(exc)


def test_a_replica_that_fails_to_start_is_reported_in_one_line():
    ray_text = (
        "The actor died because of an error raised in its creation task, ray::ReplicaActor.__init__() "
        "(pid=4242, ip=10.0.0.7, actor_id=abc, repr=<workers.stream.replica.ReplicaActor object at 0x7f>)\n"
        '  File "/app/workers/stream/replica.py", line 53, in __init__\n    check_codecs()\n'
        '  File "/app/workers/stream/kafka_codecs.py", line 63, in check_codecs\n    raise CodecUnavailable(...)\n'
        "workers.errors.CodecUnavailable: kafka-python cannot read lz4-compressed Kafka batches (its library is not "
        "installed): install 'lz4' (pip install 'kafka-python[lz4]')"
    )
    assert start_failure(RuntimeError(ray_text)) == (
        "CodecUnavailable: kafka-python cannot read lz4-compressed Kafka batches (its library is not installed): "
        "install 'lz4' (pip install 'kafka-python[lz4]')"
    )
    assert start_failure(RuntimeError("")) == "RuntimeError"


def test_the_fleets_periodic_report_counts_replicas_not_ready_and_names_their_paused_partitions(monkeypatch):
    import threading

    from structlog.testing import capture_logs

    from workers.settings import Settings
    from workers.stream.fleet import Fleet

    stop = threading.Event()
    paused = {"topic": "requests", "partition": 2, "offset": 6, "cause": "UnsupportedCodecError: lz4"}
    stats = [
        {"replica": 0, "alive": True, "ready": True, "undecodable": [], "tagged": 5},
        {"replica": 1, "alive": True, "ready": False, "undecodable": [paused], "tagged": 3},
    ]

    def once(self, timeout_s: float = 10.0) -> list[dict]:  # noqa: ANN001
        stop.set()
        return stats

    monkeypatch.setattr(Fleet, "stats", once)
    with capture_logs() as logs:
        Fleet(Settings()).serve_forever(stop, report_every_s=0.01)  # connects to nothing until started
    [report] = [e for e in logs if e["event"] == "fleet.stats"]
    assert (report["not_ready"], report["alive"], report["tagged"]) == (1, 2, 8)
    [line] = [e for e in logs if e["event"] == "fleet.partition_undecodable"]
    assert line["replica"] == 1 and (line["partition"], line["offset"]) == (2, 6)
