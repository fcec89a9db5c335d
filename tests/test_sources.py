"""Queue sources without a broker: what a message becomes, [sources.NAME] config, the
store's source queries, and the outcome message. (Real brokers: test_sources_redis.py,
test_sources_amqp.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd import config
from batchd.config import ConfigError
from batchd.prices import Price, Rates, Unknown
from batchd.sources import default_consumer
from batchd.sources.amqp import to_message
from batchd.sources.base import Invalid, Message, Take, parse
from batchd.sources.outcome import build, error_summary, recorded_cost, usd
from batchd.spool import Spool
from batchd.states import JobState
from batchd.store import Duplicate, NewJob, Store


def msg(**fields: str | bytes) -> Message:
    return Message("1-0", {k: v.encode() if isinstance(v, str) else v for k, v in fields.items()})


# --- parse ---------------------------------------------------------------------------------


def test_a_message_with_jsonl_name_and_metadata() -> None:
    got = parse(msg(name="nightly", jsonl=b"{}\n", metadata='{"team":"a"}'), "src", {}, None)
    assert got == Take("nightly", b"{}\n", None, {"team": "a"})


def test_a_path_message_takes_its_name_from_the_file(tmp_path: Path) -> None:
    got = parse(msg(path=str(tmp_path / "daily.jsonl.gz")), "src", {}, None)
    assert got == Take("daily", None, tmp_path / "daily.jsonl.gz", {})
    assert parse(msg(jsonl=b"x"), "src", {}, None) == Take("src", b"x", None, {})


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"name": "x"}, "missing_content"),
        ({"jsonl": "a", "path": "/tmp/a.jsonl"}, "ambiguous_content"),
        ({"name": ".hidden", "jsonl": "a"}, "invalid_name"),
        ({"name": "a/b", "jsonl": "a"}, "invalid_name"),
        ({"jsonl": "a", "metadata": "{"}, "invalid_metadata"),
        ({"jsonl": "a", "metadata": '{"batchd_x": "1"}'}, "invalid_metadata"),
        ({"jsonl": "a", "metadata": '{"n": 1}'}, "invalid_metadata"),
        ({"path": "relative.jsonl"}, "invalid_path"),
    ],
)
def test_invalid_messages_say_why(fields: dict[str, str], code: str) -> None:
    got = parse(msg(**fields), "src", {}, None)
    assert isinstance(got, Invalid) and got.code == code, got


def test_path_root_confines_paths(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jsonl").write_text("{}")
    (root / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    assert parse(msg(path="sub/a.jsonl"), "s", {}, root) == Take(
        "a", None, root / "sub/a.jsonl", {}
    )
    for bad in ("../secret.jsonl", str(tmp_path / "secret.jsonl"), "link.jsonl"):
        got = parse(msg(path=bad), "s", {}, root)
        assert isinstance(got, Invalid) and got.code == "invalid_path", bad


def test_an_amqp_message_without_an_id_is_known_by_its_content() -> None:
    class Delivery:
        def __init__(self, body: bytes, **headers: Any) -> None:
            self.body, self.headers, self.message_id, self.redelivered = body, headers, None, True

    a, b = to_message(Delivery(b"x", name="n")), to_message(Delivery(b"x", name="n"))  # type: ignore[arg-type]
    c = to_message(Delivery(b"y", name="n"))  # type: ignore[arg-type]
    assert a.id == b.id != c.id and a.id.startswith("sha256:")
    assert a.fields == {"name": b"n", "jsonl": b"x"} and a.redelivered
    meta = to_message(Delivery(b"", path="/p", metadata={"k": "v"}))  # type: ignore[arg-type]
    assert meta.fields == {"path": b"/p", "metadata": b'{"k":"v"}'}


def test_the_default_consumer_name_is_stable_per_spool(tmp_path: Path) -> None:
    assert default_consumer(tmp_path / "a") == default_consumer(tmp_path / "a")
    assert default_consumer(tmp_path / "a") != default_consumer(tmp_path / "b")


# --- config --------------------------------------------------------------------------------


def sources(text: str, tmp_path: Path) -> dict[str, config.SourceConfig]:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return dict(config.load(p, env={}).sources)


def test_source_config_defaults(tmp_path: Path) -> None:
    got = sources(
        '[sources.nightly]\nkind = "redis_stream"\nurl = "redis://127.0.0.1:6379/0"\n'
        'stream = "batchd:jobs"\nresults = "batchd:results"\n'
        '[sources.rabbit]\nkind = "amqp"\nurl = "amqp://u@h/v"\nqueue = "q"\nresults = "r"\n'
        'provider = "openai"\npath_root = "drop"\n',
        tmp_path,
    )
    n, q = got["nightly"], got["rabbit"]
    assert (n.group, n.max_pending_jobs, n.dead_letter_name) == ("batchd", 100, "batchd:jobs:dead")
    assert (q.dead_letter_name, q.provider, q.path_root) == ("q.dead", "openai", tmp_path / "drop")
    assert config.changed_keys(config.Config(), config.Config(sources=got)) == [
        "sources.nightly",
        "sources.rabbit",
    ]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('kind = "kafka"', r"\[sources.s\] kind"),
        ('kind = "amqp"\nurl = "redis://x"\nqueue = "q"\nresults = "r"', r"\[sources.s\] url"),
        ('kind = "amqp"\nurl = "amqp://h"\nresults = "r"', r"\[sources.s\] queue: required"),
        ('kind = "amqp"\nurl = "amqp://h"\nqueue = "q"', r"\[sources.s\] results: required"),
        ('kind = "amqp"\nurl = "amqp://h"\nqueue = "q"\nresults = "r"\nstream = "x"', "stream"),
        ('kind = "amqp"\nurl = "amqp://h"\nqueue = "q"\nresults = "r"\ngroup = "g"', "group"),
        (
            'kind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "r"\n'
            "max_pending_jobs = 0",
            r"\[sources.s\] max_pending_jobs",
        ),
        (
            'kind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "r"\nprovider = "x"',
            r"\[sources.s\] provider",
        ),
        ('kind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "s"', "results: must"),
        (
            'kind = "amqp"\nurl = "amqp://h"\nqueue = "q"\nresults = "r"\ndead_letter = "q"',
            r"\[sources.s\] dead_letter: must differ",
        ),
        (
            'kind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "r"\nnope = 1',
            r"\[sources.s\] nope: unknown key",
        ),
        (
            'kind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "r"\n'
            'password_file = "missing"',
            r"\[sources.s\] password_file",
        ),
    ],
)
def test_bad_source_config_names_the_key(tmp_path: Path, body: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        sources(f"[sources.s]\n{body}\n", tmp_path)


def test_a_source_sends_its_jobs_to_a_configured_provider(tmp_path: Path) -> None:
    got = sources(
        '[providers.claude]\nkind = "anthropic"\napi_key_env = "ANTHROPIC_API_KEY"\n'
        '[sources.s]\nkind = "redis_stream"\nurl = "redis://h"\nstream = "s"\nresults = "r"\n'
        'provider = "claude"\n',
        tmp_path,
    )
    assert got["s"].provider == "claude"
    with pytest.raises(ConfigError, match=r"\[sources.s\] provider: a configured provider"):
        sources(
            '[sources.s]\nkind = "redis_stream"\nurl = "redis://h"\nstream = "s"\n'
            'results = "r"\nprovider = "claude"\n',
            tmp_path,
        )


def test_source_names_and_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[sources.http\]"):
        sources('[sources.http]\nkind = "amqp"\n', tmp_path)
    with pytest.raises(ConfigError) as e:
        sources('[sources.s]\nkind = "amqp"\nurl = "http://u:hunter2@h"\n', tmp_path)
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    (tmp_path / "pw").write_text("s3cret\n")
    [s] = sources(
        '[sources.s]\nkind = "amqp"\nurl = "amqp://u@h/"\nqueue = "q"\nresults = "r"\n'
        'password_file = "pw"\n',
        tmp_path,
    ).values()
    assert s.password() == "s3cret" and "s3cret" not in repr(s)


# --- the store -----------------------------------------------------------------------------


async def test_a_message_id_makes_one_job_per_source(tmp_path: Path) -> None:
    async with Store.connect(tmp_path / "s.db") as store:
        await store.create_jobs(
            [NewJob("J1", "n", "processing/J1--n.jsonl.part", "a", source_msg="m1")]
        )
        with pytest.raises(Duplicate, match="source_msg"):
            await store.create_jobs(
                [NewJob("J2", "n", "processing/J2--n.jsonl.part", "a", source_msg="m1")]
            )
        assert await store.job_by_source_msg("a", "m1") is not None
        # another source may use the same id; jobs of no source have none
        await store.create_jobs([NewJob("J3", "n", "p", "b", source_msg="m1")])
        await store.create_job("J4", "n", "p", "inbox")
        assert (await store.job("J4")).source_msg is None
        reason = {"reason": "invalid_message", "code": "missing_content"}
        await store.create_jobs([NewJob("J5", "bad", "p", "a", source_msg="m2", reason=reason)])
        assert (await store.job("J5")).reason == reason
        assert await store.source_live_count("a") == 2
        assert await store.unannounced("a") == []
        await store.transition("J5", JobState.FAILED)
        assert [j.id for j in await store.unannounced("a")] == ["J5"]
        assert await store.source_live_count("a") == 1
        await store.mark_announced("J5", {"source": "a"})
        assert await store.unannounced("a") == []
        assert (await store.events("J5"))[-1].kind == "outcome_published"


# --- the outcome ---------------------------------------------------------------------------


async def test_outcome_of_a_done_job_with_cost_and_paths(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    result = spool.done / "nightly"
    result.mkdir()
    line = {
        "custom_id": "a",
        "response": {
            "status_code": 200,
            "body": {"usage": {"prompt_tokens": 1000, "completion_tokens": 500}},
        },
    }
    (result / "output.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    (result / "job.json").write_text("{}")
    async with Store.connect(tmp_path / "s.db") as store:
        await store.create_jobs([NewJob("J1", "nightly", "p", "src", source_msg="5-0")])
        for s in (JobState.VALIDATING, JobState.FAILED):
            await store.transition("J1", s)
        await store.update_job("J1", result_dir="done/nightly", model="m", requests=1, completed=1)
        job = await store.job("J1")
    price = Price(
        "openai",
        "m",
        (Rates(input=1_000_000_000, cached_input=0, cache_write=0, output=2_000_000_000),),
    )
    body = build(spool, job, price)
    assert body["job_id"] == "J1" and body["source_message_id"] == "5-0"
    assert body["cost"] == {"usd": "0.002", "requests": 1}  # 1000 x $1/M + 500 x $2/M
    assert body["paths"]["output"] == str(result / "output.jsonl")
    assert body["paths"]["errors"] is None and body["paths"]["job"] == str(result / "job.json")
    unknown = build(spool, job, Unknown("no price"))["cost"]
    assert unknown == {"usd": None, "unknown_reason": "no price", "requests": 1}
    assert usd(1) == "0.000000001"
    charges = {"requests": 3, "cost_nanos": 1_500_000, "cost_unknown": None}
    assert build(spool, job, recorded_cost(charges))["cost"] == {"usd": "0.0015", "requests": 3}
    unpriced = recorded_cost({**charges, "cost_unknown": "no price for m"})
    assert unpriced == {"usd": None, "unknown_reason": "no price for m", "requests": 3}


def test_error_summary_keeps_the_first_errors() -> None:
    reason = {
        "reason": "invalid_input",
        "errors": [{"line": i, "message": f"e{i}"} for i in range(9)],
    }
    s = error_summary(reason)
    assert s is not None and s["message"] == "e0" and len(s["errors"]) == 5
    assert error_summary(None) is None


# --- recording a read (no broker: the messages are made here) -----------------------------


async def test_record_makes_one_job_per_message_and_recognises_it_again(tmp_path: Path) -> None:
    from batchd import logs
    from batchd.metrics import Metrics
    from batchd.sources.base import record
    from batchd.stages import Context

    cfg = config.parse(
        {
            "spool": {"dir": str(tmp_path / "spool")},
            "sources": {
                "s": {"kind": "amqp", "url": "amqp://h/", "queue": "q", "results": "r"},
                "t": {"kind": "amqp", "url": "amqp://h/", "queue": "t", "results": "tr"},
            },
            "providers": {"claude": {"kind": "anthropic", "api_key_env": "K"}},
        },
        tmp_path,
        env={},
    )
    spool = Spool(cfg.spool.dir)
    spool.ensure()
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    a = Message("a", {"name": b"a", "jsonl": b'{"x":1}\n', "metadata": b'{"k":"v"}'})
    twin = Message("a", dict(a.fields))
    msgs = [
        a,
        twin,
        Message("b", {"name": b"b"}),
        Message("c", {"path": str(tmp_path / "missing.jsonl").encode()}),
        Message("d", {"path": str(tmp_path / "bad.jsonl.gz").encode()}),
    ]
    async with Store.connect(cfg.state.database) as store:
        ctx = Context(cfg, store, spool, None, Metrics(), logs.get("t"))  # type: ignore[arg-type]
        recs = await record(ctx, cfg.sources["s"], msgs)
        assert [r.known for r in recs] == [False, True, False, False, False]
        assert recs[0].job_id == recs[1].job_id and recs[0].name == "a"
        assert [r.reason["code"] if r.reason else None for r in recs[2:]] == [
            "missing_content",
            "unreadable_path",
            "invalid_compression",
        ]
        job = await store.job(recs[0].job_id)
        assert spool.path(job.input_path).read_bytes() == b'{"x":1}\n'
        assert job.input_path.endswith(".jsonl.part") and job.source_msg == "a"
        assert (spool.processing / f"{job.id}.d" / "metadata.json").exists()
        again = await record(ctx, cfg.sources["s"], [Message("a", {}), Message("c", {})])
        assert all(r.known for r in again) and again[0].job_id == job.id
        assert again[1].invalid  # a known invalid message is dead-lettered again
        assert len(await store.list_jobs()) == 4
        # a source's jobs go to its provider ([sources.NAME] provider)
        t = dataclasses.replace(cfg.sources["t"], provider="claude")
        [rec] = await record(ctx, t, [Message("z", {"name": b"z", "jsonl": b'{"x":1}\n'})])
        routed = await store.job(rec.job_id)
        assert (routed.provider, routed.source) == ("claude", "t")
        assert job.provider is None  # the default provider
