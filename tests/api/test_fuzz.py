"""Fuzzing over real HTTP: hypothesis generates methods, paths, headers and
bodies (valid, nearly valid, and garbage) for every endpoint. No request may
get a 5xx; every refusal uses the error envelope and changes no row."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.api.helpers import (
    assert_envelope,
    counts,
    task_token,
    waiting_definition,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Any character, surrogates and NUL included: the server must cope.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
short_text = st.one_of(st.sampled_from(["", "a", "wf", "b-1", " "]), any_text)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),  # NaN and infinities too: json.dumps writes them
    short_text,
)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(short_text, inner, max_size=4),
    ),
    max_leaves=12,
)


def mostly(strategy, otherwise, one_in=4):
    """``strategy``, and ``otherwise`` about once in ``one_in`` draws: most
    requests get far enough to exercise the engine, some are garbage."""
    # sampled_from, not integers(): hypothesis favours the bounds of a range.
    usual = st.sampled_from([True] * (one_in - 1) + [False])
    return usual.flatmap(lambda yes: strategy if yes else otherwise)


def maybe(strategy):
    return mostly(strategy, json_values)


def with_stray_field(bodies):
    """Now and then a field the API does not know."""
    stray = st.tuples(bodies, short_text, json_values).map(
        lambda t: {**t[0], t[1] or "stray": t[2]}
    )
    return mostly(bodies, stray, 8)


start_bodies = with_stray_field(
    st.fixed_dictionaries(
        {"business_key": maybe(st.sampled_from(["b-1", "b-2"]) | short_text)},
        optional={"input": maybe(st.dictionaries(short_text, json_values, max_size=3))},
    )
)
callback_bodies = with_stray_field(
    st.fixed_dictionaries(
        {
            "id": maybe(st.sampled_from(["m-1", "m-2"]) | short_text),
            "status": maybe(st.sampled_from(["succeeded", "failed"])),
        },
        optional={
            "output": json_values,
            "error": maybe(short_text),
            "permanent": maybe(st.booleans()),
        },
    )
)
event_bodies = with_stray_field(
    st.fixed_dictionaries(
        {
            "id": maybe(st.sampled_from(["e-1", "e-2"]) | short_text),
            "type": maybe(st.sampled_from(["payment.captured", "x"])),
            "correlation_key": maybe(st.sampled_from(["b-1", "b-2"])),
        },
        optional={"payload": json_values},
    )
)


def encoded(body_strategy):
    """A body as bytes: JSON of the structured body, any JSON, or garbage."""
    garbage = st.one_of(
        json_values.map(lambda b: json.dumps(b).encode()),
        st.binary(max_size=40),
        st.just(b""),
    )
    return mostly(body_strategy.map(lambda b: json.dumps(b).encode()), garbage)


# Header values http.client will send (no CR/LF, latin-1).
header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
    max_size=30,
).map(str.strip)
segments = st.one_of(st.sampled_from(["wf", "nope", "Wf", "-"]), any_text).map(
    lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")
)


@st.composite
def requests(draw, live_token):
    kind = draw(
        st.sampled_from(
            ["start", "start_any", "callback", "callback_any", "event", "list", "read"]
        )
    )
    method, body = "POST", b""
    if kind == "start":
        path = "/api/v1/workflows/wf/instances"
        body = draw(encoded(start_bodies))
    elif kind == "start_any":
        path = f"/api/v1/workflows/{draw(segments)}/instances"
        body = draw(encoded(start_bodies))
    elif kind == "callback":
        path = f"/api/v1/callbacks/{live_token}"
        body = draw(encoded(callback_bodies))
    elif kind == "callback_any":
        path = f"/api/v1/callbacks/{draw(segments)}"
        body = draw(encoded(callback_bodies))
    elif kind == "event":
        path = "/api/v1/events"
        body = draw(encoded(event_bodies))
    elif kind == "list":
        names = st.sampled_from(
            ["definition", "status", "business_key", "stuck", "cursor", "limit", "z"]
        )
        query = draw(st.lists(st.tuples(names, any_text), max_size=4))
        pairs = [(k, v.encode("utf-8", "surrogatepass")) for k, v in query]
        path, method = f"/api/v1/instances?{urlencode(pairs)}", "GET"
    else:
        suffix = draw(st.sampled_from(["", "/history"]))
        path, method = f"/api/v1/instances/{draw(segments)}{suffix}", "GET"
    other_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])
    method = draw(mostly(st.just(method), other_methods, 10))
    headers = {}
    content_type = draw(
        mostly(
            st.sampled_from(["application/json", "application/json; charset=utf-8"]),
            st.one_of(
                st.sampled_from(["text/plain", "application/problem+json", None]),
                header_text,
            ),
        )
    )
    if content_type:
        headers["Content-Type"] = content_type
    key = draw(mostly(st.sampled_from(["k-1", "k-2", "k-3"]), header_text))
    if key:
        headers["Idempotency-Key"] = key
    auth = draw(mostly(st.just("valid"), st.sampled_from(["none", "junk"]), 6))
    if auth == "junk":
        headers["Authorization"] = draw(header_text)
    return method, path, (body if method != "GET" else None), headers, auth == "valid"


@pytest.fixture
def live_token(api, transport):
    waiting_definition("wf")
    started = api.start("wf", business_key="b-1", idempotency_key="k")
    transport.run()
    return task_token(started.id)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_request_gets_a_server_error(raw, live_token, data):
    method, path, body, headers, auth = data.draw(requests(live_token))
    before = counts()
    reply = raw(method, path, body, headers=headers, auth=auth, content_type=None)
    event(f"{method} {path.split('/')[3].split('?')[0]} -> {reply.status}")
    assert reply.status < 500, (reply.status, reply.raw[:500])
    assert reply.headers["content-type"].startswith("application/json")
    if reply.status >= 400:
        assert_envelope(reply.status, reply.json)
        assert counts() == before, "a refused request changed the database"
