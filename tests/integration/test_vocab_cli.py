"""`ramplus vocab` against the real Redis: build, publish, activate, rollback, list, show, delete, errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from workers.cli import app


def run(*args: str, redis_url: str):
    return CliRunner().invoke(app, ["vocab", *args], env={"RAMPLUS_REDIS__URL": redis_url})


def test_the_vocab_lifecycle_through_the_cli(stack, tmp_path, unique, redis_client):
    name = f"cli-{unique}"
    (tmp_path / "tags.txt").write_text("cat\ndog\nboat\n")
    (tmp_path / "desc.json").write_text(json.dumps([{"cat": ["a small furry pet.", "whiskers and a tail."]}]))
    out = tmp_path / "v1.safetensors"
    r = CliRunner().invoke(app, ["vocab", "build", str(out), "--name", name, "--tags", str(tmp_path / "tags.txt"),
                                 "--descriptions", str(tmp_path / "desc.json"), "--text-encoder", "ramplus-tiny-text",
                                 "--text-weights", "none"])
    assert r.exit_code == 0, r.output
    assert "3 tags" in r.output

    url = stack.redis_url
    assert run("publish", str(out), redis_url=url).exit_code == 0
    assert "immutable" in run("publish", str(out), redis_url=url).output  # never an overwrite
    r = run("publish", str(out), "--version", "2", "--activate", redis_url=url)
    assert r.exit_code == 0 and f"activated {name}@2" in r.output
    assert run("activate", name, "1", redis_url=url).output.strip() == f"activated {name}@1 (was 2)"
    assert f"rolled back {name} to 2" in run("rollback", name, redis_url=url).output
    listing = run("list", name, redis_url=url).output.splitlines()
    assert listing == [f"  {name}@1", f"* {name}@2"]
    shown = json.loads(run("show", name, redis_url=url).output)
    assert shown["metadata"]["num_tags"] == 3 and shown["active"] is True and shown["dtype"] == "float16"
    r = run("delete", name, "2", redis_url=url)
    assert r.exit_code == 2 and "is active" in r.output
    assert run("delete", name, "1", redis_url=url).exit_code == 0
    r = run("activate", name, "9", redis_url=url)
    assert r.exit_code == 2 and "does not exist" in r.output
    for key in redis_client.scan_iter(match=f"ramplus:vocab:{name}:*"):
        redis_client.delete(key)


def test_an_unreachable_redis_is_named():
    r = run("list", redis_url="redis://127.0.0.1:1/0")
    assert r.exit_code == 2 and "cannot reach Redis at" in r.output and "127.0.0.1:1" in r.output
