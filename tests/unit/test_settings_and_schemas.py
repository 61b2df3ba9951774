"""Settings from env and files; request parsing; metrics federation; producer URIs; S3 keys."""

from __future__ import annotations

import json
from datetime import datetime, timezone
import re
from pathlib import Path

import pytest

from workers.errors import ErrorKind, InputError
from workers.metrics import FleetCollector, ReplicaMetrics
from workers.stream.producer import file_uri, iter_uris, stable_id
from workers.stream.s3_sink import S3ResultSink
from workers.schemas import TagRequest
from workers.settings import S3Settings, Settings


def test_settings_read_nested_environment_variables(monkeypatch):
    monkeypatch.setenv("RAMPLUS_KAFKA__TOPIC", "images")
    monkeypatch.setenv("RAMPLUS_FLEET__REPLICAS", "3")
    monkeypatch.setenv("RAMPLUS_FETCH__HTTP_HOSTS", '["*.example.com"]')
    s = Settings.load()
    assert s.kafka.topic == "images" and s.fleet.replicas == 3
    assert s.fetch.host_allowed("img.example.com") and not s.fetch.host_allowed("example.org")


def test_a_config_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch):
    path = tmp_path / "ramplus.toml"
    path.write_text('[kafka]\ntopic = "from-file"\ngroup_id = "g"\n[fleet]\nbatch_size = 7\n')
    monkeypatch.setenv("RAMPLUS_KAFKA__TOPIC", "from-env")
    s = Settings.load(path)
    assert s.kafka.topic == "from-env" and s.kafka.group_id == "g" and s.fleet.batch_size == 7


def test_a_missing_config_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings.load(tmp_path / "nope.toml")


def test_defaults_allow_fetching_nothing():
    s = Settings.load()
    assert not s.fetch.bucket_allowed("any") and not s.fetch.host_allowed("example.com") and s.fetch.file_roots == []


@pytest.mark.parametrize(
    ("payload", "kind", "words"),
    [
        (b"", ErrorKind.MALFORMED, "not JSON"),
        (b"42", ErrorKind.MALFORMED, "expected an object"),
        (b'{"id": "", "uri": "s3://b/k"}', ErrorKind.VALIDATION, "id"),
        (b'{"id": "a", "uri": "gopher://x"}', ErrorKind.VALIDATION, "unsupported URI scheme"),
        (b'{"id": "a"}', ErrorKind.VALIDATION, "uri"),
        (json.dumps({"id": "x" * 600, "uri": "s3://b/k"}).encode(), ErrorKind.VALIDATION, "id"),
    ],
)
def test_bad_requests_say_what_is_wrong(payload, kind, words):
    with pytest.raises(InputError) as info:
        TagRequest.parse(payload)
    assert info.value.kind is kind and words in str(info.value)


def test_requests_keep_unknown_fields_out_and_meta_in():
    r = TagRequest.parse(b'{"id": "a", "uri": "https://h/x.jpg", "meta": {"k": 1}, "extra": true}')
    assert r.meta == {"k": 1} and not hasattr(r, "extra")


def test_fleet_metrics_carry_a_replica_label():
    a, b = ReplicaMetrics(), ReplicaMetrics()
    a.images.inc(3)
    b.images.inc(5)
    b.dead_letters.labels(kind="decode").inc()
    families = {f.name: f for f in FleetCollector(lambda: {"0": a.exposition(), "1": b.exposition()}).collect()}
    totals = {s.labels["replica"]: s.value for s in families["ramplus_images_tagged"].samples if s.name.endswith("_total")}
    assert totals == {"0": 3.0, "1": 5.0}
    dl = [s for s in families["ramplus_dead_letters"].samples if s.name.endswith("_total")]
    assert [(s.labels["replica"], s.labels["kind"], s.value) for s in dl] == [("1", "decode", 1.0)]


def test_producer_turns_folders_into_file_uris(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "y.png").write_bytes(b"2")
    (tmp_path / "notes.txt").write_text("no")
    uris = list(iter_uris([str(tmp_path), "https://h/z.jpg"]))
    assert uris == [file_uri(tmp_path / "a" / "x.jpg"), file_uri(tmp_path / "y.png"), "https://h/z.jpg"]
    assert stable_id(uris[0]) == stable_id(uris[0]) != stable_id(uris[1])
    with pytest.raises(FileNotFoundError, match="missing"):
        list(iter_uris([str(tmp_path / "missing")]))


def test_s3_result_keys_sort_by_offset_parse_back_and_name_their_writer():
    sink, other = (S3ResultSink(S3Settings(prefix="r/"), client=object()) for _ in range(2))
    k1, k2 = sink.key(("t", 3), 9, 15), sink.key(("t", 3), 16, 100)
    assert k1 == f"r/t/00003/00000000000000000009-00000000000000000015-{sink.writer}.jsonl"
    assert k1 < k2 and sink.parse_key(k2) == (16, 100)
    assert re.fullmatch(r"[0-9a-f]{8}", sink.writer) and other.writer != sink.writer
    assert other.key(("t", 3), 9, 15) != k1  # two replicas writing the same offsets never share an object


def test_an_s3_sink_withdraws_only_its_own_objects():
    deleted = []

    class Client:
        def delete_object(self, Bucket, Key):  # noqa: N803 (boto3's names)
            deleted.append(Key)

    sink, other = (S3ResultSink(S3Settings(prefix="r/", bucket="b"), client=Client()) for _ in range(2))
    sink.withdraw(sink.key(("t", 0), 1, 2))
    with pytest.raises(ValueError, match="not written by this sink"):
        sink.withdraw(other.key(("t", 0), 1, 2))
    assert deleted == [sink.key(("t", 0), 1, 2)]


def test_every_setting_has_one_name_and_the_retired_names_are_refused_with_the_new_one(monkeypatch, tmp_path):
    from workers.settings import refuse_retired_env

    monkeypatch.setenv("RAMPLUS_LLM__MODEL", "local-model")
    monkeypatch.setenv("RAMPLUS_MODEL__CACHE_DIR", "~/elsewhere")
    settings = Settings.load()
    assert settings.llm.model == "local-model" and settings.model.cache_dir == Path.home() / "elsewhere"
    refuse_retired_env({"RAMPLUS_LLM__MODEL": "x", "RAMPLUS_MODEL__CHECKPOINT": "y"})  # the new names pass
    with pytest.raises(ValueError) as refused:
        refuse_retired_env({"RAMPLUS_CACHE_DIR": "a", "RAMPLUS_LLM_API_KEY": "sk-secret-1", "RAMPLUS_LOG_FORMAT": "json"})
    assert str(refused.value) == (
        "renamed settings: RAMPLUS_CACHE_DIR is now RAMPLUS_MODEL__CACHE_DIR, RAMPLUS_LLM_API_KEY is now "
        "RAMPLUS_LLM__API_KEY, RAMPLUS_LOG_FORMAT is now RAMPLUS_LOG__FORMAT"
    )
    assert "sk-secret-1" not in str(refused.value)  # names only, never a value
    monkeypatch.setenv("RAMPLUS_TAG_LIST", str(tmp_path))
    with pytest.raises(ValueError, match="RAMPLUS_TAG_LIST is now RAMPLUS_MODEL__TAG_LIST"):
        Settings.load()


def test_the_readme_lists_every_fleet_setting_as_the_code_defines_it():
    from workers.settings import settings_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README is stale: paste the output of `ramplus settings`"


@pytest.mark.parametrize("text", ["", "@v1", "a@", "a@b@c", "a:b", "a@v:1", "x" * 201, "a@" + "v" * 201])
def test_a_vocabulary_ref_is_parsed_in_one_place_and_refused_alike_everywhere(text):
    from workers.errors import InputError
    from workers.schemas import TagRequest, VocabRef
    from workers.vocab.store import VocabStoreError, parse_ref

    with pytest.raises(ValueError, match="expected 'name' or 'name@version'"):
        VocabRef.parse(text)
    with pytest.raises(VocabStoreError, match="expected 'name' or 'name@version'"):
        parse_ref(text)
    with pytest.raises(InputError) as info:
        TagRequest.parse(json.dumps({"id": "a", "uri": "s3://b/k.jpg", "vocab": text}).encode())
    assert info.value.kind.value == "validation"


@pytest.mark.parametrize(("text", "parts"), [("coco", ("coco", None)), ("coco@v2", ("coco", "v2")), ("a b@2026-12-05T10.00", ("a b", "2026-12-05T10.00"))])
def test_a_vocabulary_ref_parses_and_prints_back(text, parts):
    from workers.schemas import VocabRef

    ref = VocabRef.parse(text)
    assert tuple(ref) == parts and str(ref) == text


def test_one_result_line_builder_for_the_stream_and_the_backfill(monkeypatch):
    from ramplus_core.tagging import ImageTags
    from workers import schemas
    from workers.schemas import SourceRef, TagResult

    fixed = datetime(2026, 12, 5, 12, 0, 1, 250000, tzinfo=timezone.utc)
    monkeypatch.setattr(schemas, "utc_now", lambda: fixed)
    tagged = ImageTags.of([("cat", 0.9), ('say "hi"\\ é\n', 0.5), ("tiny", 1.25e-05)], "coco@2")
    kwargs = dict(id="r1", uri='s3://b/"tags":[]/k.jpg', model="tiny@64", worker="w",
                  source=SourceRef(topic="t", partition=1, offset=7), meta={"n": 1.5e-07, "s": "\u2028"})
    line = TagResult.line(tagged, **kwargs)
    # the same bytes as pydantic writes for the model: the schema is validated once, here, not per tag
    assert line.json == TagResult.of(tagged, **kwargs).model_copy(update={"ts": fixed}).model_dump_json()
    assert (line.id, line.offset) == ("r1", 7)
    parsed = json.loads(line.json)
    assert parsed["tags"][1] == {"tag": 'say "hi"\\ é\n', "score": 0.5} and parsed["vocab"] == "coco@2" and "scores" not in parsed
    assert parsed["source"] == {"topic": "t", "partition": 1, "offset": 7} and parsed["uri"] == 's3://b/"tags":[]/k.jpg'
    empty = TagResult.line(ImageTags.of([], "v@1"), id="e", uri="u", model="m", worker="w")
    assert json.loads(empty.json)["tags"] == [] and empty.offset is None


def test_overrides_are_validated_like_every_other_setting():
    from pydantic import ValidationError

    from workers.settings import Settings

    base = Settings()
    changed = base.with_overrides(fleet__replicas=3, kafka__topic="t2", fleet__ray_address=None)
    assert (changed.fleet.replicas, changed.kafka.topic) == (3, "t2") and base.kafka.topic != "t2"  # a copy
    assert changed.fleet.ray_address == base.fleet.ray_address  # None keeps
    with pytest.raises(ValidationError):
        base.with_overrides(fleet__replicas=0)  # a setattr would have let it through
    with pytest.raises(ValidationError):  # cross-field rules run too
        base.with_overrides(fleet__drain_timeout_s=10_000)
    with pytest.raises(ValueError, match="unknown setting 'fleet__nope'"):
        base.with_overrides(fleet__nope=1)
