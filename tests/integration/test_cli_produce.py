"""`ramplus produce` against the real Kafka: one request per image, keyed by its id."""

from __future__ import annotations

import json

from kafka import KafkaConsumer
from typer.testing import CliRunner

from workers.cli import app
from workers.stream.producer import file_uri, stable_id


def test_produce_publishes_a_folder_as_file_uris(stack, tmp_path, unique, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "sub/b.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("skip me")
    topic = f"produce-{unique}"
    monkeypatch.setenv("RAMPLUS_KAFKA__BOOTSTRAP_SERVERS", stack.kafka_bootstrap)
    result = CliRunner().invoke(app, ["produce", str(tmp_path), "--topic", topic, "--vocab", "v@2"])
    assert result.exit_code == 0, result.output
    assert "published 2 requests" in result.output

    consumer = KafkaConsumer(topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, group_id=None)
    messages = list(consumer)
    consumer.close()
    expected = {file_uri(tmp_path / "a.jpg"), file_uri(tmp_path / "sub" / "b.png")}
    bodies = [json.loads(m.value) for m in messages]
    assert {b["uri"] for b in bodies} == expected
    for m, body in zip(messages, bodies):
        assert body["id"] == stable_id(body["uri"]) == m.key.decode() and body["vocab"] == "v@2"


def test_produce_names_an_unreachable_broker(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["produce", str(tmp_path)], env={"RAMPLUS_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.exit_code == 2
    assert "127.0.0.1:1" in result.output
