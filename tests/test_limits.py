"""Per-key limits: requests and tokens per minute, and a monthly budget.

Each test runs against a service of its own (same database, same fake upstream),
once with the counters in memory and once in Redis (`TEST_REDIS_URL`, which CI
sets); the limiter's clock is pinned to the middle of a minute so that no test
straddles two windows.
"""

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import httpx2
import openai
import pytest
from fastapi import FastAPI

from app.core.config import ConfigError, load_settings
from app.core.security import Principal
from app.db.database import create_engine, create_session_factory
from app.services.limits import Limiter, RedisCounters, open_limiter
from main import create_app
from tests.conftest import ADMIN_KEY, Caller, sdk_for, service_settings
from tests.fake_upstream import FakeUpstream
from tests.helpers import assert_error, http_client
from tests.server import ThreadedServer


@dataclass
class Limited:
    url: str
    app: FastAPI

    @property
    def limiter(self) -> Limiter:
        limiter: Limiter = self.app.state.limiter
        return limiter

    def client(self, key: str) -> httpx2.Client:
        return http_client(self.url, key)


@pytest.fixture(scope="module", params=["memory", "redis"])
def limited_service(request: pytest.FixtureRequest, database_url: str, upstream: FakeUpstream) -> Iterator[Limited]:
    overrides = {}
    if request.param == "redis":
        redis_url = os.environ.get("TEST_REDIS_URL")
        if not redis_url:
            pytest.skip("TEST_REDIS_URL is not set (CI sets it; `bash .ci/run` fails without Redis)")
        overrides["redis_url"] = redis_url
    app = create_app(service_settings(database_url, upstream, **overrides))
    with ThreadedServer(app) as server:
        yield Limited(server.url, app)


@pytest.fixture
def limited(limited_service: Limited) -> Iterator[Limited]:
    """The service, its limiter's clock pinned 30 s into the current minute."""
    now = time.time()
    pinned = now - now % 60 + 30
    limited_service.limiter.clock = lambda: pinned
    yield limited_service
    limited_service.limiter.clock = time.time


def key_id(limited: Limited, key: str) -> str:
    with limited.client(key) as client:
        me = client.get("/api/v1/me")
    assert me.status_code == 200, me.text
    value: str = me.json()["key_id"]
    return value


def send(client: httpx2.Client, chat_id: str, content: str = "hello") -> httpx2.Response:
    return client.post(f"/api/v1/chats/{chat_id}/messages", json={"content": content})


def test_requests_per_minute_are_refused_past_the_limit_until_the_next_minute(
    limited: Limited, make_user: Callable[..., Caller], bob: Caller
) -> None:
    alice = make_user("alice", rpm_limit=2)
    chat = alice.chat()["id"]
    ident = key_id(limited, alice.key)
    with limited.client(alice.key) as client:
        assert send(client, chat).status_code == 200
        assert send(client, chat).status_code == 200
        refused = send(client, chat)
        assert_error(
            refused,
            429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            message=f"Rate limit reached for requests per minute on key {ident}: Limit 2, Used 2. "
            "Please try again in 30s.",
        )
        assert refused.headers["retry-after"] == "30"
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"] == "30s"
        assert "x-should-retry" not in refused.headers  # the SDK may retry after `retry-after`
        # Nothing of the refused send was stored.
        history = client.get(f"/api/v1/history/{chat}").json()["data"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 2

    # The /v1 endpoint shares the key's window.
    with sdk_for(limited.url, alice.key) as sdk, pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "rate_limit_exceeded"

    # Another key is not limited by this one's window.
    with limited.client(bob.key) as other:
        assert send(other, bob.chat()["id"]).status_code == 200

    # The next minute opens a new window.
    pinned = limited.limiter.clock() + 60
    limited.limiter.clock = lambda: pinned
    with limited.client(alice.key) as client:
        assert send(client, chat).status_code == 200


def test_tokens_per_minute_stop_calls_once_the_minute_has_used_them(
    limited: Limited, make_user: Callable[..., Caller]
) -> None:
    alice = make_user("alice", tpm_limit=30)
    ident = key_id(limited, alice.key)
    with sdk_for(limited.url, alice.key) as sdk:
        first = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello " * 20}])
        assert first.usage is not None
        used = first.usage.total_tokens
        assert used >= 30
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["message"] == (
        f"Rate limit reached for tokens per minute on key {ident}: Limit 30, Used {used}. Please try again in 30s."
    )
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_small_call_under_the_token_limit_leaves_room_for_the_next(
    limited: Limited, make_user: Callable[..., Caller]
) -> None:
    alice = make_user("alice", tpm_limit=100_000)
    with sdk_for(limited.url, alice.key) as sdk:
        for _ in range(3):
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


def test_a_spent_budget_refuses_calls_until_an_admin_raises_it(
    limited: Limited, make_user: Callable[..., Caller], upstream: FakeUpstream
) -> None:
    alice = make_user("alice", budget_usd="0.000001")
    chat = alice.chat()["id"]
    ident = key_id(limited, alice.key)
    with limited.client(alice.key) as client:
        first = send(client, chat, "hello " * 20)
        assert first.status_code == 200, first.text
        usage = first.json()["usage"]
        spent = (
            Decimal(usage["prompt_tokens"]) * Decimal("0.15") + Decimal(usage["completion_tokens"]) * Decimal("0.60")
        ) / 1_000_000
        assert spent > Decimal("0.000001")
        calls = len(upstream.requests)
        refused = send(client, chat)
        assert_error(
            refused,
            429,
            type="insufficient_quota",
            code="insufficient_quota",
            message=f"You exceeded your current quota: key {ident} has spent ${spent.normalize():f} of its $0.000001 "
            "budget this month (UTC). An admin can raise `budget_usd`.",
        )
        assert refused.headers["x-should-retry"] == "false"
        assert len(upstream.requests) == calls  # refused before the upstream
        # What was spent is read back from the ledger's rollups, not only remembered.
        limited.limiter.forget(ident)
        assert send(client, chat).status_code == 429

    with limited.client(ADMIN_KEY) as admin:
        raised = admin.patch(f"/api/v1/keys/{ident}", json={"budget_usd": 5})
        assert raised.status_code == 200, raised.text
        assert raised.json()["budget_usd"] == 5.0
    with limited.client(alice.key) as client:
        assert send(client, chat).status_code == 200


def test_limits_are_set_read_and_changed_through_the_keys_api(
    service: str, admin: httpx2.Client, make_user: Callable[..., Caller]
) -> None:
    alice = make_user("alice", rpm_limit=60, tpm_limit=10_000, budget_usd=25)
    me = alice.http.get("/api/v1/me").json()
    assert (me["rpm_limit"], me["tpm_limit"], me["budget_usd"]) == (60, 10_000, 25.0)
    ident = me["key_id"]

    changed = admin.patch(f"/api/v1/keys/{ident}", json={"rpm_limit": None, "tpm_limit": 500})
    assert changed.status_code == 200, changed.text
    key = changed.json()
    assert (key["rpm_limit"], key["tpm_limit"], key["budget_usd"]) == (None, 500, 25.0)
    listed = admin.get(f"/api/v1/users/{alice.user_id}/keys").json()["data"]
    assert [(k["rpm_limit"], k["tpm_limit"], k["budget_usd"]) for k in listed] == [(None, 500, 25.0)]
    me = alice.http.get("/api/v1/me").json()  # the key cache forgot the old limits at once
    assert (me["rpm_limit"], me["tpm_limit"], me["budget_usd"]) == (None, 500, 25.0)

    for bad, param in (
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"tpm_limit": -5}, "tpm_limit"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"rpm_limit": "lots"}, "rpm_limit"),
    ):
        assert_error(admin.patch(f"/api/v1/keys/{ident}", json=bad), 400, code="invalid_value", param=param)
    assert_error(admin.patch("/api/v1/keys/key_missing", json={"rpm_limit": 1}), 404, code="not_found", param="key_id")
    refused = alice.http.patch(f"/api/v1/keys/{ident}", json={"rpm_limit": 1_000_000})
    assert_error(refused, 403, code="permission_denied")


def test_a_request_refused_for_another_reason_uses_none_of_the_limit(
    limited: Limited, make_user: Callable[..., Caller]
) -> None:
    alice = make_user("alice", rpm_limit=1)
    chat = alice.chat()["id"]
    with limited.client(alice.key) as client:
        bad = client.post(f"/api/v1/chats/{chat}/messages", json={"content": "hi", "params": {"temperature": 9}})
        assert bad.status_code == 400, bad.text
        assert send(client, chat).status_code == 200
        assert send(client, chat).status_code == 429


def test_with_redis_unreachable_calls_go_on_and_start_up_names_redis_url(database_url: str) -> None:
    async def main() -> None:
        engine = create_engine(load_settings(database_url=database_url))
        try:
            factory = create_session_factory(engine)
            limiter = Limiter(RedisCounters("redis://127.0.0.1:1/0"), factory)
            principal = Principal("usr_x", "user", "key_x", None, None, rpm_limit=1, tpm_limit=10)
            for _ in range(3):
                await limiter.admit(principal)  # no counters: logged, and let through
            await limiter.aclose()
            with pytest.raises(ConfigError, match=r"^REDIS_URL: Redis does not answer"):
                await open_limiter("redis://127.0.0.1:1/0", factory)
        finally:
            await engine.dispose()

    asyncio.run(main())
