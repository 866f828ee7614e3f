"""Authentication: API keys, their lifecycle, roles and model restrictions."""

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.db.models import Base
from app.services.users import ensure_admin_user
from tests.conftest import Caller
from tests.fake_upstream import FakeUpstream
from tests.helpers import assert_error, bearer, fetch_rows, http_client

NOT_ADMIN = "This operation requires an admin API key."


@pytest.fixture
def anonymous(service: str) -> Iterator[httpx2.Client]:
    """A client that sends no key unless a request adds one."""
    with http_client(service) as client:
        yield client


def _key_id(caller: Caller) -> str:
    response = caller.http.get("/api/v1/me")
    assert response.status_code == 200, response.text
    key_id: str = response.json()["key_id"]
    return key_id


def _new_key(admin: httpx2.Client, user_id: str, **fields: Any) -> dict[str, Any]:
    response = admin.post(f"/api/v1/users/{user_id}/keys", json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- the Authorization header


def test_missing_authorization_header_is_rejected_with_401_missing_api_key(anonymous: httpx2.Client) -> None:
    response = anonymous.get("/api/v1/me")
    assert_error(response, 401, code="missing_api_key")


def test_empty_authorization_header_is_rejected_with_401_missing_api_key(anonymous: httpx2.Client) -> None:
    response = anonymous.get("/api/v1/me", headers={"authorization": ""})
    assert_error(response, 401, code="missing_api_key")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "sk-os-abcdef", "Token sk-os-abcdef", "Bearer " + "a" * 257],
    ids=["basic", "bearer-no-token", "no-scheme", "other-scheme", "token-too-long"],
)
def test_malformed_authorization_header_is_rejected_with_401(anonymous: httpx2.Client, header: str) -> None:
    response = anonymous.get("/api/v1/me", headers={"authorization": header})
    assert_error(
        response, 401, code="invalid_api_key", message="Malformed Authorization header; expected 'Bearer YOUR_KEY'."
    )


def test_bearer_scheme_is_case_insensitive(anonymous: httpx2.Client, alice: Caller) -> None:
    response = anonymous.get("/api/v1/me", headers={"authorization": f"bearer {alice.key}"})
    assert response.status_code == 200, response.text
    assert response.json()["user"]["id"] == alice.user_id


def test_unknown_key_is_rejected_with_401_invalid_api_key(anonymous: httpx2.Client) -> None:
    response = anonymous.get(
        "/api/v1/me", headers={"authorization": "Bearer sk-os-thisKeyWasNeverIssuedToAnyone0000000000000"}
    )
    assert_error(response, 401, code="invalid_api_key", message="Incorrect API key provided.")


def test_key_with_one_character_changed_is_rejected_with_401(anonymous: httpx2.Client, alice: Caller) -> None:
    forged = alice.key[:-1] + ("A" if alice.key[-1] != "A" else "B")
    response = anonymous.get("/api/v1/me", headers=bearer(forged))
    assert_error(response, 401, code="invalid_api_key")


def test_missing_key_is_rejected_with_401_before_the_body_is_validated(anonymous: httpx2.Client) -> None:
    response = anonymous.post("/api/v1/chats", json={"title": 5, "colour": "red"})
    assert_error(response, 401, code="missing_api_key")


def test_missing_key_is_rejected_with_401_even_when_the_body_is_not_json(anonymous: httpx2.Client) -> None:
    response = anonymous.post("/api/v1/chats", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 401, code="missing_api_key")


# --------------------------------------------------------------------------- revocation and expiry


def test_revoking_a_key_returns_the_deleted_object(admin: httpx2.Client, alice: Caller) -> None:
    key_id = _key_id(alice)
    response = admin.delete(f"/api/v1/keys/{key_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": key_id, "object": "api_key.deleted", "deleted": True}


def test_revoked_key_is_rejected_with_401_api_key_revoked(admin: httpx2.Client, alice: Caller) -> None:
    assert admin.delete(f"/api/v1/keys/{_key_id(alice)}").status_code == 200
    response = alice.http.get("/api/v1/me")
    assert_error(response, 401, code="api_key_revoked", message="This API key has been revoked.")


def test_revoked_key_cannot_create_chats(admin: httpx2.Client, alice: Caller) -> None:
    assert admin.delete(f"/api/v1/keys/{_key_id(alice)}").status_code == 200
    response = alice.http.post("/api/v1/chats", json={"title": "after revocation"})
    assert_error(response, 401, code="api_key_revoked")


def test_revoking_one_key_leaves_the_users_other_keys_working(
    anonymous: httpx2.Client, admin: httpx2.Client, alice: Caller
) -> None:
    other = _new_key(admin, alice.user_id, name="second")
    assert admin.delete(f"/api/v1/keys/{_key_id(alice)}").status_code == 200
    response = anonymous.get("/api/v1/me", headers=bearer(other["key"]))
    assert response.status_code == 200, response.text
    assert response.json()["key_id"] == other["id"]


def test_expired_key_is_rejected_with_401_api_key_expired(
    anonymous: httpx2.Client, admin: httpx2.Client, alice: Caller
) -> None:
    expires = time.time() + 1.5
    key = _new_key(admin, alice.user_id, expires_at=expires)
    headers = bearer(key["key"])
    assert anonymous.get("/api/v1/me", headers=headers).status_code == 200
    time.sleep(max(0.0, expires - time.time()) + 0.3)
    response = anonymous.get("/api/v1/me", headers=headers)
    assert_error(response, 401, code="api_key_expired", message="This API key has expired.")


def test_key_cannot_be_created_already_expired(admin: httpx2.Client, alice: Caller) -> None:
    response = admin.post(f"/api/v1/users/{alice.user_id}/keys", json={"expires_at": int(time.time()) - 10})
    assert_error(response, 400, code="invalid_value", param="expires_at")


# --------------------------------------------------------------------------- roles


ADMIN_ROUTES = [
    ("POST", "/api/v1/users", {"name": "mallory"}),
    ("GET", "/api/v1/users", None),
    ("POST", "/api/v1/users/{user_id}/keys", {}),
    ("GET", "/api/v1/users/{user_id}/keys", None),
    ("DELETE", "/api/v1/keys/{key_id}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=[f"{m} {p}" for m, p, _ in ADMIN_ROUTES])
def test_non_admin_is_rejected_from_admin_routes_with_403(
    alice: Caller, method: str, path: str, body: dict[str, Any] | None
) -> None:
    url = path.format(user_id=alice.user_id, key_id=_key_id(alice))
    response = alice.http.request(method, url, json=body)
    assert_error(response, 403, code="permission_denied", message=NOT_ADMIN)


def test_non_admin_cannot_revoke_their_own_key(alice: Caller) -> None:
    alice.http.delete(f"/api/v1/keys/{_key_id(alice)}")
    assert alice.http.get("/api/v1/me").status_code == 200


def test_non_admin_cannot_issue_a_key(admin: httpx2.Client, alice: Caller) -> None:
    alice.http.post(f"/api/v1/users/{alice.user_id}/keys", json={"name": "sneaky"})
    keys = admin.get(f"/api/v1/users/{alice.user_id}/keys").json()["data"]
    assert len(keys) == 1


def test_non_admin_cannot_create_a_user(admin: httpx2.Client, alice: Caller) -> None:
    alice.http.post("/api/v1/users", json={"name": "mallory", "role": "admin"})
    names = [user["name"] for user in admin.get("/api/v1/users").json()["data"]]
    assert "mallory" not in names


def test_admin_role_user_key_can_use_admin_routes(anonymous: httpx2.Client, admin: httpx2.Client) -> None:
    created = admin.post("/api/v1/users", json={"name": "ops", "role": "admin"})
    assert created.status_code == 201, created.text
    key = _new_key(admin, created.json()["id"])
    response = anonymous.post(
        "/api/v1/users",
        json={"name": "made by ops"},
        headers=bearer(key["key"]),
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "made by ops"


# --------------------------------------------------------------------------- /me


def test_me_describes_a_user_and_their_key(anonymous: httpx2.Client, admin: httpx2.Client) -> None:
    user = admin.post("/api/v1/users", json={"name": "alice"}).json()
    key = _new_key(admin, user["id"], name="laptop", allowed_models=["gpt-4o", "gpt-4o-mini"])
    response = anonymous.get("/api/v1/me", headers=bearer(key["key"]))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "me",
        "user": {"id": user["id"], "object": "user", "name": "alice", "role": "user", "created_at": user["created_at"]},
        "role": "user",
        "key_id": key["id"],
        "key_name": "laptop",
        "allowed_models": ["gpt-4o", "gpt-4o-mini"],
        "rpm_limit": None,
        "tpm_limit": None,
        "budget_usd": None,
    }


def _ensure_admin_user(database_url: str) -> None:
    async def run() -> None:
        engine = create_async_engine(database_url)
        try:
            async with AsyncSession(engine) as session:
                await ensure_admin_user(session)
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_me_describes_the_environment_admin_key(admin: httpx2.Client, database_url: str) -> None:
    _ensure_admin_user(database_url)  # tables are emptied between tests; startup made this row
    response = admin.get("/api/v1/me")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "object": "me",
        "user": {
            "id": "usr_admin",
            "object": "user",
            "name": "admin",
            "role": "admin",
            "created_at": body["user"]["created_at"],
        },
        "role": "admin",
        "key_id": "key_env_admin",
        "key_name": "ADMIN_API_KEY",
        "allowed_models": None,
        "rpm_limit": None,
        "tpm_limit": None,
        "budget_usd": None,
    }
    assert isinstance(body["user"]["created_at"], int)


# --------------------------------------------------------------------------- the secret


def test_created_key_starts_with_sk_os_and_its_prefix_is_a_prefix_of_it(admin: httpx2.Client, alice: Caller) -> None:
    key = _new_key(admin, alice.user_id)
    assert key["key"].startswith("sk-os-")
    assert key["key"].startswith(key["prefix"])
    assert key["prefix"].startswith("sk-os-")
    assert len(key["key"]) - len(key["prefix"]) >= 32  # the prefix gives away little of the secret


def test_each_created_key_is_different(admin: httpx2.Client, alice: Caller) -> None:
    keys = {_new_key(admin, alice.user_id)["key"] for _ in range(5)} | {alice.key}
    assert len(keys) == 6


def test_created_key_response_has_exactly_the_documented_fields(admin: httpx2.Client, alice: Caller) -> None:
    key = _new_key(admin, alice.user_id, name="ci")
    assert set(key) == {
        "id",
        "object",
        "user_id",
        "name",
        "prefix",
        "allowed_models",
        "rpm_limit",
        "tpm_limit",
        "budget_usd",
        "expires_at",
        "revoked_at",
        "created_at",
        "key",
    }
    assert key["object"] == "api_key"
    assert key["id"].startswith("key_")
    assert key["user_id"] == alice.user_id
    assert key["name"] == "ci"


def test_listed_keys_never_include_the_secret(admin: httpx2.Client, alice: Caller) -> None:
    created = _new_key(admin, alice.user_id, name="ci")
    response = admin.get(f"/api/v1/users/{alice.user_id}/keys")
    assert response.status_code == 200, response.text
    listed = response.json()["data"]
    assert len(listed) == 2
    for key in listed:
        assert "key" not in key
        assert alice.key not in response.text
        assert created["key"] not in response.text
    (same,) = [k for k in listed if k["id"] == created["id"]]
    assert same == {k: v for k, v in created.items() if k != "key"}


def test_me_never_includes_the_secret(alice: Caller) -> None:
    response = alice.http.get("/api/v1/me")
    assert alice.key not in response.text
    assert alice.key[len("sk-os-") + 8 :] not in response.text


def test_key_secret_is_not_stored_in_the_database(admin: httpx2.Client, alice: Caller, database_url: str) -> None:
    key = _new_key(admin, alice.user_id)
    hidden = key["key"][len(key["prefix"]) :]
    for table in Base.metadata.sorted_tables:
        for row in fetch_rows(database_url, f"SELECT * FROM {table.name}"):
            for value in row:
                assert key["key"] not in str(value), table.name
                assert hidden not in str(value), table.name
                assert alice.key not in str(value), table.name


# --------------------------------------------------------------------------- allowed_models


@pytest.fixture
def restricted(make_user: Callable[..., Caller]) -> Caller:
    return make_user("carol", allowed_models=["gpt-4o"])


def _model_not_found(response: httpx2.Response, model: str) -> None:
    assert_error(
        response,
        404,
        code="model_not_found",
        param="model",
        message=f"The model `{model}` does not exist or you do not have access to it.",
    )


def test_restricted_key_can_create_a_chat_with_an_allowed_model(restricted: Caller) -> None:
    chat = restricted.chat(model="gpt-4o")
    assert chat["model"] == "gpt-4o"


def test_restricted_key_gets_404_model_not_found_creating_a_chat_with_another_model(restricted: Caller) -> None:
    response = restricted.http.post("/api/v1/chats", json={"model": "gpt-4o-mini"})
    _model_not_found(response, "gpt-4o-mini")
    assert restricted.http.get("/api/v1/chats").json()["data"] == []


def test_restricted_key_can_send_with_an_allowed_model(restricted: Caller, upstream: FakeUpstream) -> None:
    chat = restricted.chat(model="gpt-4o")
    response = restricted.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi"})
    assert response.status_code == 200, response.text
    assert response.json()["assistant_message"]["content"] == "Echo: hi"
    completions = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert len(completions) == 1
    assert completions[0].body["model"] == "gpt-4o"


def test_restricted_key_gets_404_model_not_found_sending_with_another_model(
    restricted: Caller, upstream: FakeUpstream
) -> None:
    chat = restricted.chat(model="gpt-4o")
    response = restricted.http.post(
        f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi", "model": "gpt-4o-mini"}
    )
    _model_not_found(response, "gpt-4o-mini")
    assert restricted.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 0
    assert restricted.http.get(f"/api/v1/history/{chat['id']}").json()["data"] == []
    assert upstream.requests == []


def test_restricted_key_gets_404_model_not_found_streaming_with_another_model(
    restricted: Caller, upstream: FakeUpstream
) -> None:
    chat = restricted.chat(model="gpt-4o")
    response = restricted.http.post(
        f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi", "model": "o3-mini", "stream": True}
    )
    _model_not_found(response, "o3-mini")
    assert restricted.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 0
    assert upstream.requests == []


def test_restricted_key_gets_404_model_not_found_switching_a_chat_to_another_model(restricted: Caller) -> None:
    chat = restricted.chat(model="gpt-4o")
    response = restricted.http.patch(f"/api/v1/chats/{chat['id']}", json={"model": "gpt-4o-mini"})
    _model_not_found(response, "gpt-4o-mini")
    assert restricted.http.get(f"/api/v1/chats/{chat['id']}").json()["model"] == "gpt-4o"


def test_unrestricted_key_can_use_any_model(alice: Caller) -> None:
    chat = alice.chat(model="o3-mini")
    assert chat["model"] == "o3-mini"
