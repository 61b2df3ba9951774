"""`RAMPLUS_MODEL__COMPILE` (issue 16, step 4): the image encoder compiled for fixed batch sizes, a partial
batch padded to its bucket and the padding dropped, every bucket compiled before the first real batch so
that no batch in the stream ever recompiles, and the same tags as the eager model."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from helpers import jpeg_bytes, make_tiny_model, random_images
from workers.settings import ModelSettings, batch_buckets
from workers.stream.engine import TaggingEngine


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly (fast on 2 cores)."""

    def __init__(self) -> None:
        self.graphs: list[tuple[int, ...]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward


@pytest.fixture
def images():
    return [jpeg_bytes(im) for im in random_images(11, seed=1)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def max_score_difference(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.names == y.names  # threshold 0: every tag, in the same order
        worst = max(worst, max(abs(u - v) for u, v in zip(x.values, y.values)))
    return worst


def test_warm_up_compiles_each_bucket_once_and_no_batch_size_recompiles_after_it(images):
    backend = CountingBackend()
    engine = TaggingEngine(make_tiny_model(num_tags=24), device="cpu", threshold=0.0, compile_buckets=[4, 2, 8], compile_backend=backend)
    eager = TaggingEngine(make_tiny_model(num_tags=24), device="cpu", threshold=0.0)
    assert engine.buckets == [2, 4, 8]
    assert engine.warm_up() > 0
    assert len(backend.graphs) == 3  # one graph per bucket, all before any real batch
    pixels = [engine.decode(b, f"img{i}") for i, b in enumerate(images)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile now would raise
        for n in (1, 2, 3, 5, 8, 11):  # 11: more than the largest bucket, run as 8 + 3 (padded to 4)
            got, want = engine.infer(pixels[:n]), eager.infer(pixels[:n])
            assert len(got) == n  # the padding is dropped
            assert max_score_difference(got, want) < 1e-5
    assert len(backend.graphs) == 3


def test_a_vocabulary_of_another_size_does_not_recompile(images, tiny_text_encoder):
    from ramplus_core import Vocabulary

    backend = CountingBackend()
    engine = TaggingEngine(make_tiny_model(num_tags=24), device="cpu", threshold=0.0, compile_buckets=[4], compile_backend=backend)
    engine.warm_up()
    engine.set_vocabulary(Vocabulary.from_tags(["cat", "dog", "car"], tiny_text_encoder.encode, text_encoder=tiny_text_encoder.id, name="mini"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        tags = engine.infer([engine.decode(b, "x") for b in images[:3]])
    assert [t.vocab for t in tags] == ["mini@1"] * 3 and all(len(t.names) == 3 for t in tags)
    assert len(backend.graphs) == 1


def test_bucket_settings():
    assert batch_buckets(128) == [16, 32, 64, 128]
    assert batch_buckets(3) == [1, 3]
    assert ModelSettings().buckets_for(64) is None  # off by default
    assert ModelSettings(compile=True).buckets_for(64) == [8, 16, 32, 64]
    assert ModelSettings(compile=True, compile_buckets=[8, 48]).buckets_for(64) == [8, 48]
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        ModelSettings(compile=True, compile_buckets=[0, 8])
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        TaggingEngine(make_tiny_model(), device="cpu", compile_buckets=[0])


@pytest.mark.slow
def test_inductor_gives_the_eager_models_tags(images):
    """The real compiler (what a GPU replica runs, here generating CPU code): same tags, scores within 1e-4."""
    engine = TaggingEngine(make_tiny_model(num_tags=24), device="cpu", threshold=0.0, compile_buckets=[2, 4])
    eager = TaggingEngine(make_tiny_model(num_tags=24), device="cpu", threshold=0.0)
    engine.warm_up()
    pixels = [engine.decode(b, f"img{i}") for i, b in enumerate(images)]
    for n in (1, 3, 4, 7):
        assert max_score_difference(engine.infer(pixels[:n]), eager.infer(pixels[:n])) < 1e-4


def test_a_replica_compiles_and_warms_up_before_it_joins_its_group(monkeypatch):
    import functools

    from workers.settings import Settings
    from workers.stream import replica as replica_module

    backend = CountingBackend()
    seen: dict[str, object] = {}

    class JoiningSource:  # stands for KafkaSource, which subscribes (joins the group) in its constructor
        hooks = on_assigned = None

        def __init__(self, settings, *, client_id, metrics, instance_id):
            seen["graphs_when_joining"] = len(backend.graphs)
            seen["warmup_seconds"] = metrics.warmup_seconds._value.get()

    class Idle:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def recover(self, *args) -> None:
            pass

    monkeypatch.setattr(replica_module, "KafkaSource", JoiningSource)
    for name in ("KafkaDeadLetters", "S3ResultSink", "UriFetcher"):
        monkeypatch.setattr(replica_module, name, Idle)
    monkeypatch.setattr(replica_module, "TaggingEngine", functools.partial(TaggingEngine, compile_backend=backend))
    settings = Settings(model={"compile": True, "device": "cpu"}, fleet={"batch_size": 8})
    replica = replica_module.Replica(settings, model=make_tiny_model())
    assert replica.engine.buckets == [1, 2, 4, 8]
    assert seen["graphs_when_joining"] == 4 and seen["warmup_seconds"] > 0
