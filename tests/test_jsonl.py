"""Tests for batchd.jsonl: one test per rule, incremental feeding, and the bad-input corpus."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from batchd.jsonl import (
    ENDPOINTS,
    UNBOUNDED,
    Limits,
    Problem,
    Summary,
    Validator,
    format_problem,
    validate_path,
)

DATA = Path(__file__).parent / "data"
CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"


def req(cid: Any = "r1", model: Any = "gpt-4o-mini", url: Any = CHAT, **over: Any) -> bytes:
    """One request line (no newline); ``over`` replaces top-level keys, ``...`` drops one."""
    d: dict[str, Any] = {
        "custom_id": cid,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": f"hi {cid}"}]},
    }
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def emb(cid: str, inp: Any) -> bytes:
    body = {"model": "text-embedding-3-small", "input": inp}
    return json.dumps({"custom_id": cid, "method": "POST", "url": EMB, "body": body}).encode()


def lines(*items: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(item + end for item in items)


def check(tmp_path: Path, data: bytes, **kw: Any) -> Summary:
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    return validate_path(path, **kw)


def codes(s: Summary) -> list[tuple[str, int]]:
    return [(p.code, p.line) for p in s.problems]


# -- valid input --------------------------------------------------------------


def test_valid_chat_file(tmp_path: Path) -> None:
    data = lines(req("a"), req("b"), req("c"))
    s = check(tmp_path, data)
    assert s.ok and s.problems == []
    assert (s.requests, s.bytes, s.endpoint, s.model) == (3, len(data), CHAT, "gpt-4o-mini")
    assert s.est_tokens == sum(len(x) // 4 for x in data.split(b"\n")[:-1])


def test_no_trailing_newline_and_crlf_are_fine(tmp_path: Path) -> None:
    assert check(tmp_path, req("a") + b"\n" + req("b")).ok
    s = check(tmp_path, lines(req("a"), req("b"), end=b"\r\n"))
    assert s.ok and s.requests == 2
    assert s.est_tokens == 2 * (len(req("a")) // 4)  # the \r is not counted


def test_all_endpoints_accepted(tmp_path: Path) -> None:
    assert len(ENDPOINTS) == 8
    for url in ENDPOINTS:
        assert check(tmp_path, lines(req(url=url))).ok, url


def test_huge_single_line_is_valid(tmp_path: Path) -> None:
    s = check(tmp_path, lines(req(model="m", body={"model": "m", "pad": "x" * 10_000_000})))
    assert s.ok and s.est_tokens > 2_500_000


# -- one test per rule ---------------------------------------------------------


def test_bom(tmp_path: Path) -> None:
    assert codes(check(tmp_path, b"\xef\xbb\xbf" + lines(req("a"), req("b")))) == [("bom", 1)]


def test_invalid_utf8(tmp_path: Path) -> None:
    bad = req("b").replace(b"hi", b"h\xff")
    assert codes(check(tmp_path, lines(req("a"), bad))) == [("invalid_utf8", 2)]


def test_nul_byte(tmp_path: Path) -> None:
    bad = req("b").replace(b"hi", b"h\x00")
    assert codes(check(tmp_path, lines(req("a"), bad))) == [("nul_byte", 2)]


@pytest.mark.parametrize("blank", [b"", b"   ", b"\t", b"\r"])
def test_blank_line(tmp_path: Path, blank: bytes) -> None:
    assert codes(check(tmp_path, lines(req("a"), blank, req("b")))) == [("blank_line", 2)]


def test_blank_lines_at_end(tmp_path: Path) -> None:
    assert codes(check(tmp_path, lines(req("a")) + b"\n")) == [("blank_line", 2)]
    assert codes(check(tmp_path, lines(req("a")) + b"  ")) == [("blank_line", 2)]


def test_invalid_json(tmp_path: Path) -> None:
    s = check(tmp_path, lines(req("a"), b'{"custom_id": "b",', req("c")))
    assert codes(s) == [("invalid_json", 2)]
    assert check(tmp_path, lines(req("a")) + req("b")[:30]).problems[0].line == 2


def test_not_object(tmp_path: Path) -> None:
    s = check(tmp_path, lines(b"[1, 2]", b"3", b'"s"', b"null", req("a")))
    assert codes(s) == [("not_object", 1), ("not_object", 2), ("not_object", 3), ("not_object", 4)]


def test_missing_custom_id(tmp_path: Path) -> None:
    assert codes(check(tmp_path, lines(req(custom_id=...)))) == [("missing_custom_id", 1)]


@pytest.mark.parametrize("cid", ["", 7, None, ["x"], {"a": 1}, True])
def test_invalid_custom_id(tmp_path: Path, cid: Any) -> None:
    assert codes(check(tmp_path, lines(req(cid)))) == [("invalid_custom_id", 1)]


def test_duplicate_custom_id(tmp_path: Path) -> None:
    s = check(tmp_path, lines(req("a"), req("b"), req("a")))
    assert codes(s) == [("duplicate_custom_id", 3)]
    assert "line 1" in s.problems[0].message


@pytest.mark.parametrize("method", ["GET", "post", None, ...])
def test_invalid_method(tmp_path: Path, method: Any) -> None:
    assert codes(check(tmp_path, lines(req(method=method)))) == [("invalid_method", 1)]


@pytest.mark.parametrize("url", ["/v1/batches", "/chat/completions", "", 5, None, ...])
def test_invalid_url(tmp_path: Path, url: Any) -> None:
    s = check(tmp_path, lines(req(url=url)))
    assert codes(s) == [("invalid_url", 1)] and s.endpoint is None


def test_url_mismatch(tmp_path: Path) -> None:
    s = check(tmp_path, lines(req("a", url="/v1/bogus"), req("b"), req("c", url="/v1/responses")))
    assert codes(s) == [("invalid_url", 1), ("url_mismatch", 3)]
    assert s.endpoint == CHAT


def test_missing_body(tmp_path: Path) -> None:
    assert codes(check(tmp_path, lines(req(body=...)))) == [("missing_body", 1)]


@pytest.mark.parametrize("body", [[], "gpt-4o-mini", None, 1])
def test_invalid_body(tmp_path: Path, body: Any) -> None:
    assert codes(check(tmp_path, lines(req(body=body)))) == [("invalid_body", 1)]


@pytest.mark.parametrize("model", [..., 4, None, ""])
def test_missing_model(tmp_path: Path, model: Any) -> None:
    line = req(model=model) if model is not ... else req(body={"messages": []})
    assert codes(check(tmp_path, lines(line))) == [("missing_model", 1)]


def test_model_mismatch(tmp_path: Path) -> None:
    s = check(tmp_path, lines(req("a", model=1), req("b"), req("c", model="gpt-4o")))
    assert codes(s) == [("missing_model", 1), ("model_mismatch", 3)]
    assert s.model == "gpt-4o-mini"


def test_empty_file(tmp_path: Path) -> None:
    s = check(tmp_path, b"")
    assert codes(s) == [("empty_file", 0)] and s.requests == 0 and not s.ok


def test_too_many_requests(tmp_path: Path) -> None:
    s = check(tmp_path, lines(*(req(f"r{i}") for i in range(5))), limits=Limits(max_requests=3))
    assert codes(s) == [("too_many_requests", 4)] and s.requests == 5


def test_file_too_large(tmp_path: Path) -> None:
    data = lines(req("a"), req("b"))
    s = check(tmp_path, data, limits=Limits(max_bytes=100))
    assert codes(s) == [("file_too_large", 0)]
    assert str(len(data)) in s.problems[0].message and "100" in s.problems[0].message


def test_unbounded_limits_report_no_limit_problem(tmp_path: Path) -> None:
    assert UNBOUNDED == Limits(1 << 62, 1 << 62, 1 << 62)
    path = tmp_path / "many.jsonl"
    path.write_bytes(lines(*(req(f"r{i}") for i in range(50_001))))
    assert codes(validate_path(path, max_problems=1)) == [("too_many_requests", 50_001)]
    s = validate_path(path, UNBOUNDED)
    assert s.ok and s.requests == 50_001


def test_nofollow_never_follows_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_bytes(lines(req()))
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert validate_path(link).ok  # followed by default, as `batchd validate` does
    with pytest.raises(OSError) as e:
        validate_path(link, nofollow=True)
    assert e.value.errno == errno.ELOOP
    s = validate_path(real, UNBOUNDED, nofollow=True)  # a regular file reads as usual
    assert s.ok and s.requests == 1


def test_embedding_inputs_counted(tmp_path: Path) -> None:
    inputs: list[Any] = ["one", ["a", "b", "c"], [1, 2, 3, 4], [[1, 2], [3]], "x"]
    data = lines(*(emb(f"e{i}", inp) for i, inp in enumerate(inputs)))
    s = check(tmp_path, data)
    assert s.ok and s.embedding_inputs == 1 + 3 + 1 + 2 + 1 and s.endpoint == EMB
    assert codes(check(tmp_path, data, limits=Limits(max_embedding_inputs=7))) == [
        ("too_many_embedding_inputs", 5)
    ]
    assert check(tmp_path, lines(req())).embedding_inputs == 0


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    s = check(tmp_path, lines(b'{"method": "GET", "url": "/x", "body": []}'))
    assert [p.code for p in s.problems] == [
        "missing_custom_id",
        "invalid_method",
        "invalid_url",
        "invalid_body",
    ]


# -- limits on reporting -------------------------------------------------------


def test_max_problems_cap_keeps_counting(tmp_path: Path) -> None:
    data = lines(*([b"nope"] * 50 + [req(f"r{i}") for i in range(10)]))
    s = check(tmp_path, data, limits=Limits(max_requests=55, max_bytes=500), max_problems=5)
    assert s.requests == 60 and s.bytes == len(data)
    assert codes(s) == [
        ("file_too_large", 0),
        *[("invalid_json", i) for i in range(1, 6)],
        ("too_many_requests", 56),
    ]


def test_messages_do_not_echo_user_data(tmp_path: Path) -> None:
    big = "Z" * 5000
    data = lines(req(big), req(big), req("b", model=big), req("c", url=big), b"{" + big.encode())
    s = check(tmp_path, data)
    assert len(s.problems) == 4
    for p in s.problems:
        assert p.message.count("Z") <= 200, p


def test_format_problem() -> None:
    p = Problem(3, "invalid_json", "invalid JSON")
    assert format_problem("in put.jsonl", p) == "in put.jsonl:3: invalid_json: invalid JSON"


# -- incremental feeding -------------------------------------------------------

MIXED = (
    b"\xef\xbb\xbf"
    + lines(req("a\u00e9\u4e2d"), req("b"), b"", req("b"), b"[1]", end=b"\r\n")
    + req("c").replace(b"hi", b"\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80")
    + b"\n"
    + req("d").replace(b"hi", b"\xe4\xb8")
    + b"\n"
    + emb("e", ["x", "y"])
    + b"\n"
    + req("f")[:-5]
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_incremental_feeding_matches_validate_path(tmp_path: Path, size: int) -> None:
    expected = check(tmp_path, MIXED)
    assert len(expected.problems) >= 5
    v = Validator()
    for i in range(0, len(MIXED), size):
        v.feed(MIXED[i : i + size])
    assert v.finish() == expected


def test_awkward_splits_match(tmp_path: Path) -> None:
    expected = check(tmp_path, MIXED)
    for cut in range(len(MIXED) + 1):
        v = Validator()
        v.feed(MIXED[:cut])
        v.feed(b"")
        v.feed(MIXED[cut:])
        assert v.finish() == expected, cut


def test_finish_is_final() -> None:
    v = Validator()
    v.feed(lines(req()))
    s = v.finish()
    assert s.ok and v.finish() is s
    with pytest.raises(RuntimeError):
        v.feed(b"x")


# -- corpus ----------------------------------------------------------------------


def test_bad_corpus_matches_expected() -> None:
    bad = DATA / "bad"
    expected = json.loads((bad / "EXPECTED.json").read_text(encoding="utf-8"))
    files = sorted(p.name for p in bad.iterdir() if p.name != "EXPECTED.json")
    assert files == sorted(expected) and len(files) >= 24
    for name in files:
        s = validate_path(bad / name)
        assert not s.ok, name
        first = s.problems[0]
        assert (first.code, first.line) == (expected[name]["code"], expected[name]["line"]), name


def test_good_corpus() -> None:
    chat = validate_path(DATA / "good" / "chat.jsonl")
    assert chat.ok and (chat.requests, chat.model, chat.endpoint) == (5, "gpt-4o-mini", CHAT)
    e = validate_path(DATA / "good" / "embeddings.jsonl")
    assert e.ok and (e.requests, e.model, e.endpoint) == (5, "text-embedding-3-small", EMB)
    assert e.embedding_inputs == 8
