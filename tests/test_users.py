"""Users and API keys, as an admin manages them."""

import time
from typing import Any

import httpx2
import pytest

from tests.helpers import assert_error, execute


@pytest.fixture
def no_users(service: str, database_url: str) -> None:
    """Not even the admin user the service makes at startup: lists start empty."""
    execute(database_url, "DELETE FROM users")


def _user(admin: httpx2.Client, name: str, **fields: Any) -> dict[str, Any]:
    response = admin.post("/api/v1/users", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _key(admin: httpx2.Client, user_id: str, **fields: Any) -> dict[str, Any]:
    response = admin.post(f"/api/v1/users/{user_id}/keys", json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


# --------------------------------------------------------------------------- users


def test_create_user_returns_201_and_the_user(admin: httpx2.Client) -> None:
    before = int(time.time())
    response = admin.post("/api/v1/users", json={"name": "alice"})
    after = int(time.time())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {
        "id": body["id"],
        "object": "user",
        "name": "alice",
        "role": "user",
        "created_at": body["created_at"],
    }
    assert body["id"].startswith("usr_")
    assert len(body["id"]) > len("usr_")
    assert isinstance(body["created_at"], int)
    assert before <= body["created_at"] <= after


def test_create_user_with_admin_role(admin: httpx2.Client) -> None:
    assert _user(admin, "root", role="admin")["role"] == "admin"


def test_created_users_get_distinct_ids(admin: httpx2.Client) -> None:
    assert _user(admin, "same")["id"] != _user(admin, "same")["id"]


def test_create_user_with_unknown_role_is_400(admin: httpx2.Client) -> None:
    response = admin.post("/api/v1/users", json={"name": "x", "role": "superuser"})
    assert_error(response, 400, code="invalid_value", param="role")


def test_create_user_without_name_is_400(admin: httpx2.Client) -> None:
    response = admin.post("/api/v1/users", json={})
    assert_error(response, 400, code="invalid_value", param="name", message="Missing required parameter: 'name'.")


def test_create_user_with_empty_name_is_400(admin: httpx2.Client) -> None:
    response = admin.post("/api/v1/users", json={"name": ""})
    assert_error(response, 400, code="invalid_value", param="name")


def test_list_users_is_newest_first(admin: httpx2.Client, no_users: None) -> None:
    ids = [_user(admin, f"u{i}")["id"] for i in range(3)]
    page = admin.get("/api/v1/users").json()
    assert page == {
        "object": "list",
        "data": page["data"],
        "first_id": ids[2],
        "last_id": ids[0],
        "has_more": False,
    }
    assert _ids(page) == ids[::-1]
    assert [u["name"] for u in page["data"]] == ["u2", "u1", "u0"]


def test_list_users_pages_with_limit_and_after(admin: httpx2.Client, no_users: None) -> None:
    ids = [_user(admin, f"u{i}")["id"] for i in range(5)]
    newest_first = ids[::-1]

    first = admin.get("/api/v1/users", params={"limit": 2}).json()
    assert (_ids(first), first["first_id"], first["last_id"], first["has_more"]) == (
        newest_first[0:2],
        newest_first[0],
        newest_first[1],
        True,
    )
    second = admin.get("/api/v1/users", params={"limit": 2, "after": first["last_id"]}).json()
    assert (_ids(second), second["first_id"], second["last_id"], second["has_more"]) == (
        newest_first[2:4],
        newest_first[2],
        newest_first[3],
        True,
    )
    third = admin.get("/api/v1/users", params={"limit": 2, "after": second["last_id"]}).json()
    assert (_ids(third), third["first_id"], third["last_id"], third["has_more"]) == (
        newest_first[4:5],
        newest_first[4],
        newest_first[4],
        False,
    )


def test_list_users_page_that_exactly_fills_the_limit_has_no_more(admin: httpx2.Client, no_users: None) -> None:
    ids = [_user(admin, f"u{i}")["id"] for i in range(2)]
    page = admin.get("/api/v1/users", params={"limit": 2}).json()
    assert _ids(page) == ids[::-1]
    assert page["has_more"] is False


def test_list_users_in_ascending_order(admin: httpx2.Client, no_users: None) -> None:
    ids = [_user(admin, f"u{i}")["id"] for i in range(3)]
    page = admin.get("/api/v1/users", params={"order": "asc", "limit": 2}).json()
    assert (_ids(page), page["has_more"]) == (ids[:2], True)
    rest = admin.get("/api/v1/users", params={"order": "asc", "after": ids[1]}).json()
    assert (_ids(rest), rest["has_more"]) == (ids[2:], False)


def test_list_users_when_there_are_none(admin: httpx2.Client, no_users: None) -> None:
    page = admin.get("/api/v1/users").json()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_list_users_with_unknown_cursor_is_400(admin: httpx2.Client) -> None:
    response = admin.get("/api/v1/users", params={"after": "usr_000000000000000000000000"})
    assert_error(response, 400, code="invalid_cursor", param="after")


# --------------------------------------------------------------------------- keys


def test_create_key_returns_201_with_its_settings(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    before = int(time.time())
    response = admin.post(
        f"/api/v1/users/{user['id']}/keys",
        json={
            "name": "laptop",
            "allowed_models": ["gpt-4o"],
            "expires_at": 4_102_444_800,
            "rpm_limit": 600,
            "tpm_limit": 200_000,
            "budget_usd": "12.50",
        },
    )
    assert response.status_code == 201, response.text
    key = response.json()
    assert key == {
        "id": key["id"],
        "object": "api_key",
        "user_id": user["id"],
        "name": "laptop",
        "prefix": key["prefix"],
        "allowed_models": ["gpt-4o"],
        "rpm_limit": 600,
        "tpm_limit": 200_000,
        "budget_usd": 12.5,
        "expires_at": 4_102_444_800,
        "revoked_at": None,
        "created_at": key["created_at"],
        "key": key["key"],
    }
    assert key["id"].startswith("key_")
    assert before <= key["created_at"] <= int(time.time())


def test_create_key_accepts_expires_at_in_iso_8601(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    key = _key(admin, user["id"], expires_at="2100-01-01T00:00:00Z")
    assert key["expires_at"] == 4_102_444_800


def test_create_key_with_defaults(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    key = _key(admin, user["id"])
    assert (key["name"], key["allowed_models"], key["expires_at"], key["revoked_at"]) == (None, None, None, None)


def test_create_key_with_unknown_field_is_400(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    response = admin.post(f"/api/v1/users/{user['id']}/keys", json={"scopes": ["all"]})
    assert_error(response, 400, code="invalid_value", param="scopes")


def test_create_key_with_empty_allowed_models_is_400(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    response = admin.post(f"/api/v1/users/{user['id']}/keys", json={"allowed_models": []})
    assert_error(response, 400, code="invalid_value", param="allowed_models")


def test_list_keys_shows_a_users_keys_newest_first_without_secrets(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    keys = [_key(admin, user["id"], name=f"k{i}") for i in range(3)]
    page = admin.get(f"/api/v1/users/{user['id']}/keys").json()
    expected = [{k: v for k, v in key.items() if k != "key"} for key in keys[::-1]]
    assert page == {
        "object": "list",
        "data": expected,
        "first_id": keys[2]["id"],
        "last_id": keys[0]["id"],
        "has_more": False,
    }


def test_list_keys_pages_with_limit_and_after(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    ids = [_key(admin, user["id"])["id"] for _ in range(3)]
    first = admin.get(f"/api/v1/users/{user['id']}/keys", params={"limit": 2}).json()
    assert (_ids(first), first["has_more"]) == ([ids[2], ids[1]], True)
    rest = admin.get(f"/api/v1/users/{user['id']}/keys", params={"limit": 2, "after": first["last_id"]}).json()
    assert (_ids(rest), rest["has_more"]) == ([ids[0]], False)


def test_list_keys_shows_only_that_users_keys(admin: httpx2.Client) -> None:
    alice, bob = _user(admin, "alice"), _user(admin, "bob")
    alice_key = _key(admin, alice["id"])
    _key(admin, bob["id"])
    assert _ids(admin.get(f"/api/v1/users/{alice['id']}/keys").json()) == [alice_key["id"]]


def test_list_keys_rejects_another_users_key_as_cursor(admin: httpx2.Client) -> None:
    alice, bob = _user(admin, "alice"), _user(admin, "bob")
    bob_key = _key(admin, bob["id"])
    response = admin.get(f"/api/v1/users/{alice['id']}/keys", params={"after": bob_key["id"]})
    assert_error(response, 400, code="invalid_cursor", param="after")


def test_revoke_key_returns_the_deleted_object_and_lists_it_as_revoked(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    key = _key(admin, user["id"])
    before = int(time.time())
    response = admin.delete(f"/api/v1/keys/{key['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": key["id"], "object": "api_key.deleted", "deleted": True}
    (listed,) = admin.get(f"/api/v1/users/{user['id']}/keys").json()["data"]
    assert listed["id"] == key["id"]
    assert isinstance(listed["revoked_at"], int)
    assert before <= listed["revoked_at"] <= int(time.time())


def test_revoking_a_key_twice_keeps_its_first_revocation_time(admin: httpx2.Client) -> None:
    user = _user(admin, "alice")
    key = _key(admin, user["id"])
    assert admin.delete(f"/api/v1/keys/{key['id']}").status_code == 200
    first = admin.get(f"/api/v1/users/{user['id']}/keys").json()["data"][0]["revoked_at"]
    again = admin.delete(f"/api/v1/keys/{key['id']}")
    assert again.status_code == 200, again.text
    assert admin.get(f"/api/v1/users/{user['id']}/keys").json()["data"][0]["revoked_at"] == first


def test_revoke_unknown_key_is_404(admin: httpx2.Client) -> None:
    response = admin.delete("/api/v1/keys/key_000000000000000000000000")
    assert_error(
        response,
        404,
        code="not_found",
        param="key_id",
        message="No API key found with id 'key_000000000000000000000000'.",
    )


def test_create_key_for_unknown_user_is_404(admin: httpx2.Client) -> None:
    response = admin.post("/api/v1/users/usr_000000000000000000000000/keys", json={})
    assert_error(
        response,
        404,
        code="not_found",
        param="user_id",
        message="No user found with id 'usr_000000000000000000000000'.",
    )


def test_list_keys_for_unknown_user_is_404(admin: httpx2.Client) -> None:
    response = admin.get("/api/v1/users/usr_000000000000000000000000/keys")
    assert_error(response, 404, code="not_found", param="user_id")
