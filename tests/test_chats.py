"""Chats: create, read, list (order, cursors, filters), update and delete."""

import time
from typing import Any

import pytest

from tests.conftest import Caller
from tests.helpers import assert_error, missing_chat_id

CHAT_KEYS = {
    "id",
    "object",
    "title",
    "model",
    "system_prompt",
    "instructions",
    "params",
    "context",
    "metadata",
    "tags",
    "archived",
    "pinned",
    "message_count",
    "created_at",
    "updated_at",
}


DEFAULT_CONTEXT = {"strategy": "window", "max_context_tokens": None, "reserve_tokens": None}


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


def _list(caller: Caller, **params: Any) -> dict[str, Any]:
    response = caller.http.get("/api/v1/chats", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _titles(caller: Caller, **params: Any) -> list[str | None]:
    return [chat["title"] for chat in _list(caller, **params)["data"]]


def _patch(caller: Caller, chat_id: str, **fields: Any) -> dict[str, Any]:
    response = caller.http.patch(f"/api/v1/chats/{chat_id}", json=fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- create and read


def test_create_chat_returns_201_and_the_full_chat_with_defaults(alice: Caller) -> None:
    before = int(time.time())
    response = alice.http.post("/api/v1/chats", json={})
    after = int(time.time())
    assert response.status_code == 201, response.text
    chat = response.json()
    assert chat == {
        "id": chat["id"],
        "object": "chat",
        "title": None,
        "model": "gpt-4o-mini",
        "system_prompt": None,
        "instructions": None,
        "params": {},
        "context": DEFAULT_CONTEXT,
        "metadata": {},
        "tags": [],
        "archived": False,
        "pinned": False,
        "message_count": 0,
        "created_at": chat["created_at"],
        "updated_at": chat["created_at"],
    }
    assert chat["id"].startswith("chat_")
    assert isinstance(chat["created_at"], int)
    assert before <= chat["created_at"] <= after


def test_create_chat_with_every_field(alice: Caller) -> None:
    chat = alice.chat(
        title="Trip planning",
        model="gpt-4o",
        system_prompt="You are a travel agent.",
        instructions="Prefer trains.",
        params={"temperature": 0.5, "top_p": 0.9, "max_tokens": 256, "stop": ["END"], "seed": 7},
        context={"strategy": "none", "max_context_tokens": 4000, "reserve_tokens": 500},
        metadata={"project": "holiday", "owner": "alice"},
        tags=["travel", "2025"],
        pinned=True,
    )
    assert {k: v for k, v in chat.items() if k not in ("id", "created_at", "updated_at")} == {
        "object": "chat",
        "title": "Trip planning",
        "model": "gpt-4o",
        "system_prompt": "You are a travel agent.",
        "instructions": "Prefer trains.",
        "params": {"temperature": 0.5, "top_p": 0.9, "max_tokens": 256, "stop": ["END"], "seed": 7},
        "context": {"strategy": "none", "max_context_tokens": 4000, "reserve_tokens": 500},
        "metadata": {"project": "holiday", "owner": "alice"},
        "tags": ["travel", "2025"],
        "archived": False,
        "pinned": True,
        "message_count": 0,
    }


def test_create_chat_with_empty_body_is_accepted(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={})
    assert response.status_code == 201, response.text


def test_create_chat_with_unknown_param_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"params": {"temprature": 1}})
    assert_error(response, 400, code="invalid_value", param="params.temprature")


def test_create_chat_with_out_of_range_temperature_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"params": {"temperature": 2.5}})
    assert_error(response, 400, code="invalid_value", param="params.temperature")


def test_create_chat_with_invalid_model_name_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"model": "gpt 4o; drop table"})
    assert_error(response, 400, code="invalid_value", param="model")


def test_get_chat_returns_what_create_returned(alice: Caller) -> None:
    chat = alice.chat(title="hello", metadata={"a": "b"}, tags=["x"])
    response = alice.http.get(f"/api/v1/chats/{chat['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == chat
    assert set(response.json()) == CHAT_KEYS


def test_get_unknown_chat_is_404(alice: Caller) -> None:
    chat_id = missing_chat_id()
    response = alice.http.get(f"/api/v1/chats/{chat_id}")
    assert_error(response, 404, code="not_found", param="chat_id", message=f"No chat found with id '{chat_id}'.")


def test_message_count_counts_the_message_and_its_reply(alice: Caller) -> None:
    chat = alice.chat()
    assert alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi"}).status_code == 200
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["message_count"] == 2


# --------------------------------------------------------------------------- list: order and cursors


def test_list_chats_is_newest_first(alice: Caller) -> None:
    ids = [alice.chat(title=f"c{i}")["id"] for i in range(3)]
    page = _list(alice)
    assert page == {
        "object": "list",
        "data": page["data"],
        "first_id": ids[2],
        "last_id": ids[0],
        "has_more": False,
    }
    assert _ids(page) == ids[::-1]
    assert all(set(chat) == CHAT_KEYS for chat in page["data"])


def test_list_chats_walks_pages_with_after(alice: Caller) -> None:
    ids = [alice.chat(title=f"c{i}")["id"] for i in range(5)][::-1]
    pages = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        page = _list(alice, **params)
        pages.append((_ids(page), page["first_id"], page["last_id"], page["has_more"]))
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [
        (ids[0:2], ids[0], ids[1], True),
        (ids[2:4], ids[2], ids[3], True),
        ([ids[4]], ids[4], ids[4], False),
    ]


def test_list_chats_in_ascending_order(alice: Caller) -> None:
    ids = [alice.chat(title=f"c{i}")["id"] for i in range(5)]
    first = _list(alice, order="asc", limit=3)
    assert (_ids(first), first["has_more"]) == (ids[:3], True)
    rest = _list(alice, order="asc", limit=3, after=first["last_id"])
    assert (_ids(rest), rest["first_id"], rest["last_id"], rest["has_more"]) == (ids[3:], ids[3], ids[4], False)


def test_list_chats_when_there_are_none(alice: Caller) -> None:
    assert _list(alice) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_list_chats_after_the_last_chat_is_empty(alice: Caller) -> None:
    first = alice.chat()
    assert _list(alice, after=first["id"]) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_list_chats_with_unknown_cursor_is_400_invalid_cursor(alice: Caller) -> None:
    alice.chat()
    chat_id = missing_chat_id()
    response = alice.http.get("/api/v1/chats", params={"after": chat_id})
    assert_error(
        response, 400, code="invalid_cursor", param="after", message=f"No such object for cursor 'after': '{chat_id}'."
    )


def test_list_chats_with_cursor_of_a_deleted_chat_is_400_invalid_cursor(alice: Caller) -> None:
    chat = alice.chat()
    assert alice.http.delete(f"/api/v1/chats/{chat['id']}").status_code == 200
    response = alice.http.get("/api/v1/chats", params={"after": chat["id"]})
    assert_error(response, 400, code="invalid_cursor", param="after")


@pytest.mark.parametrize("limit", [0, -1, 101])
def test_list_chats_with_limit_out_of_range_is_400(alice: Caller, limit: int) -> None:
    response = alice.http.get("/api/v1/chats", params={"limit": limit})
    assert_error(response, 400, code="invalid_value", param="limit")


def test_list_chats_with_non_numeric_limit_is_400(alice: Caller) -> None:
    response = alice.http.get("/api/v1/chats", params={"limit": "ten"})
    assert_error(response, 400, code="invalid_value", param="limit")


def test_list_chats_accepts_limit_100(alice: Caller) -> None:
    alice.chat()
    assert len(_list(alice, limit=100)["data"]) == 1


def test_list_chats_with_unknown_order_is_400(alice: Caller) -> None:
    response = alice.http.get("/api/v1/chats", params={"order": "random"})
    assert_error(response, 400, code="invalid_value", param="order")


def test_list_chats_defaults_to_20_per_page(alice: Caller) -> None:
    for i in range(21):
        alice.chat(title=str(i))
    page = _list(alice)
    assert (len(page["data"]), page["has_more"]) == (20, True)


# --------------------------------------------------------------------------- list: filters


def test_list_chats_filters_archived(alice: Caller) -> None:
    old = alice.chat(title="old")
    alice.chat(title="active")
    _patch(alice, old["id"], archived=True)
    assert _titles(alice, archived="true") == ["old"]
    assert _titles(alice, archived="false") == ["active"]
    assert _titles(alice) == ["active", "old"]


def test_list_chats_filters_pinned(alice: Caller) -> None:
    alice.chat(title="pinned", pinned=True)
    alice.chat(title="plain")
    assert _titles(alice, pinned="true") == ["pinned"]
    assert _titles(alice, pinned="false") == ["plain"]


def test_list_chats_filters_by_tag(alice: Caller) -> None:
    alice.chat(title="both", tags=["work", "urgent"])
    alice.chat(title="work", tags=["work"])
    alice.chat(title="none")
    alice.chat(title="prefix", tags=["workshop"])
    assert _titles(alice, tag="work") == ["work", "both"]
    assert _titles(alice, tag="urgent") == ["both"]
    assert _titles(alice, tag="missing") == []


def test_list_chats_combines_filters(alice: Caller) -> None:
    alice.chat(title="work pinned", tags=["work"], pinned=True)
    alice.chat(title="work plain", tags=["work"])
    alice.chat(title="home pinned", tags=["home"], pinned=True)
    assert _titles(alice, tag="work", pinned="true") == ["work pinned"]
    assert _titles(alice, q="pinned", tag="home") == ["home pinned"]


def test_list_chats_q_matches_words_in_title_case_insensitively(alice: Caller) -> None:
    alice.chat(title="Planning the TRIP")
    alice.chat(title="trip budget")
    alice.chat(title="Groceries")
    alice.chat()
    assert _titles(alice, q="trip") == ["trip budget", "Planning the TRIP"]
    assert _titles(alice, q="TRIP") == ["trip budget", "Planning the TRIP"]


def test_list_chats_q_requires_every_word(alice: Caller) -> None:
    alice.chat(title="Planning the TRIP")
    alice.chat(title="trip budget")
    assert _titles(alice, q="trip planning") == ["Planning the TRIP"]
    assert _titles(alice, q="trip  Budget") == ["trip budget"]
    assert _titles(alice, q="trip nothing") == []


def test_list_chats_q_matches_parts_of_words(alice: Caller) -> None:
    alice.chat(title="Planning")
    assert _titles(alice, q="plan") == ["Planning"]


def test_list_chats_q_is_case_insensitive_for_non_ascii_letters(alice: Caller) -> None:
    alice.chat(title="École d'été")
    alice.chat(title="Ωμέγα")
    assert _titles(alice, q="école") == ["École d'été"]
    assert _titles(alice, q="ΩΜΈΓΑ") == ["Ωμέγα"]


def test_list_chats_q_treats_percent_literally(alice: Caller) -> None:
    alice.chat(title="100% done")
    alice.chat(title="100 done")
    assert _titles(alice, q="%") == ["100% done"]
    assert _titles(alice, q="100%") == ["100% done"]


def test_list_chats_q_treats_underscore_literally(alice: Caller) -> None:
    alice.chat(title="snake_case")
    alice.chat(title="snakeXcase")
    assert _titles(alice, q="e_c") == ["snake_case"]


def test_list_chats_q_treats_backslash_literally(alice: Caller) -> None:
    alice.chat(title="C:\\temp")
    alice.chat(title="C:temp")
    assert _titles(alice, q=":\\t") == ["C:\\temp"]


def test_list_chats_blank_q_matches_everything(alice: Caller) -> None:
    alice.chat(title="one")
    alice.chat()
    assert _titles(alice, q="   ") == [None, "one"]


def test_list_chats_filters_page_with_cursor(alice: Caller) -> None:
    ids = [alice.chat(title=f"keep {i}" if i % 2 == 0 else f"skip {i}")["id"] for i in range(6)]
    first = _list(alice, q="keep", limit=2)
    assert (_ids(first), first["has_more"]) == ([ids[4], ids[2]], True)
    rest = _list(alice, q="keep", limit=2, after=first["last_id"])
    assert (_ids(rest), rest["has_more"]) == ([ids[0]], False)


# --------------------------------------------------------------------------- update


def test_patch_renames_a_chat(alice: Caller) -> None:
    chat = alice.chat(title="old")
    updated = _patch(alice, chat["id"], title="new")
    assert updated["title"] == "new"
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json() == updated


def test_patch_title_null_clears_it(alice: Caller) -> None:
    chat = alice.chat(title="old")
    assert _patch(alice, chat["id"], title=None)["title"] is None


def test_patch_changes_system_prompt(alice: Caller) -> None:
    chat = alice.chat(system_prompt="Be terse.")
    assert _patch(alice, chat["id"], system_prompt="Be verbose.")["system_prompt"] == "Be verbose."
    assert _patch(alice, chat["id"], system_prompt=None)["system_prompt"] is None


def test_patch_changes_model(alice: Caller) -> None:
    chat = alice.chat()
    assert _patch(alice, chat["id"], model="gpt-4o")["model"] == "gpt-4o"


def test_patch_model_null_returns_to_the_default_model(alice: Caller) -> None:
    chat = alice.chat(model="gpt-4o")
    assert _patch(alice, chat["id"], model=None)["model"] == "gpt-4o-mini"


def test_patch_changes_instructions_and_null_clears_them(alice: Caller) -> None:
    chat = alice.chat(instructions="Be brief.")
    assert _patch(alice, chat["id"], instructions="Be thorough.")["instructions"] == "Be thorough."
    assert _patch(alice, chat["id"], instructions=None)["instructions"] is None


def test_patch_replaces_context_settings_and_null_resets_them(alice: Caller) -> None:
    chat = alice.chat(context={"strategy": "none", "reserve_tokens": 100})
    updated = _patch(alice, chat["id"], context={"max_context_tokens": 2000})
    assert updated["context"] == DEFAULT_CONTEXT | {"max_context_tokens": 2000}
    assert _patch(alice, chat["id"], context=None)["context"] == DEFAULT_CONTEXT


def test_create_chat_with_unknown_context_strategy_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"context": {"strategy": "forget"}})
    assert_error(response, 400, code="invalid_value", param="context.strategy")


def test_patch_params_replaces_them(alice: Caller) -> None:
    chat = alice.chat(params={"temperature": 0.2, "top_p": 0.5})
    assert _patch(alice, chat["id"], params={"max_tokens": 10})["params"] == {"max_tokens": 10}
    assert _patch(alice, chat["id"], params=None)["params"] == {}


def test_patch_archives_and_unarchives(alice: Caller) -> None:
    chat = alice.chat()
    assert _patch(alice, chat["id"], archived=True)["archived"] is True
    assert _patch(alice, chat["id"], archived=False)["archived"] is False


def test_patch_pins_and_unpins(alice: Caller) -> None:
    chat = alice.chat()
    assert _patch(alice, chat["id"], pinned=True)["pinned"] is True
    assert _patch(alice, chat["id"], pinned=False)["pinned"] is False


def test_patch_replaces_tags_and_null_clears_them(alice: Caller) -> None:
    chat = alice.chat(tags=["a", "b"])
    assert _patch(alice, chat["id"], tags=["c"])["tags"] == ["c"]
    assert _patch(alice, chat["id"], tags=None)["tags"] == []


def test_patch_replaces_metadata_and_null_clears_it(alice: Caller) -> None:
    chat = alice.chat(metadata={"a": "1", "b": "2"})
    assert _patch(alice, chat["id"], metadata={"c": "3"})["metadata"] == {"c": "3"}
    assert _patch(alice, chat["id"], metadata=None)["metadata"] == {}


def test_patch_leaves_unsent_fields_untouched(alice: Caller) -> None:
    chat = alice.chat(
        title="keep",
        model="gpt-4o",
        system_prompt="prompt",
        params={"temperature": 1.0},
        metadata={"k": "v"},
        tags=["t"],
        pinned=True,
    )
    updated = _patch(alice, chat["id"], archived=True)
    assert updated == chat | {"archived": True, "updated_at": updated["updated_at"]}


def test_patch_with_empty_body_changes_nothing(alice: Caller) -> None:
    chat = alice.chat(title="same", tags=["t"])
    updated = _patch(alice, chat["id"])
    assert updated == chat | {"updated_at": updated["updated_at"]}


def test_patch_moves_updated_at_forward_not_created_at(alice: Caller) -> None:
    chat = alice.chat()
    updated = _patch(alice, chat["id"], title="x")
    assert updated["created_at"] == chat["created_at"]
    assert updated["updated_at"] >= chat["updated_at"]


def test_patch_unknown_chat_is_404(alice: Caller) -> None:
    chat_id = missing_chat_id()
    response = alice.http.patch(f"/api/v1/chats/{chat_id}", json={"title": "x"})
    assert_error(response, 404, code="not_found", param="chat_id")


def test_patch_with_unknown_field_is_400(alice: Caller) -> None:
    chat = alice.chat(title="same")
    response = alice.http.patch(f"/api/v1/chats/{chat['id']}", json={"colour": "red"})
    assert_error(response, 400, code="invalid_value", param="colour")
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json() == chat


def test_patch_archived_with_non_boolean_is_400(alice: Caller) -> None:
    chat = alice.chat()
    response = alice.http.patch(f"/api/v1/chats/{chat['id']}", json={"archived": "maybe"})
    assert_error(response, 400, code="invalid_value", param="archived")


# --------------------------------------------------------------------------- delete


def test_delete_chat_returns_the_deleted_object(alice: Caller) -> None:
    chat = alice.chat()
    response = alice.http.delete(f"/api/v1/chats/{chat['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": chat["id"], "object": "chat.deleted", "deleted": True}


def test_deleted_chat_is_404_on_get(alice: Caller) -> None:
    chat = alice.chat()
    alice.http.delete(f"/api/v1/chats/{chat['id']}")
    assert_error(alice.http.get(f"/api/v1/chats/{chat['id']}"), 404, code="not_found", param="chat_id")


def test_deleted_chat_history_is_404(alice: Caller) -> None:
    chat = alice.chat()
    assert alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi"}).status_code == 200
    alice.http.delete(f"/api/v1/chats/{chat['id']}")
    assert_error(alice.http.get(f"/api/v1/history/{chat['id']}"), 404, code="not_found", param="chat_id")


def test_deleted_chat_is_not_listed(alice: Caller) -> None:
    kept = alice.chat()
    gone = alice.chat()
    alice.http.delete(f"/api/v1/chats/{gone['id']}")
    assert _ids(_list(alice)) == [kept["id"]]


def test_deleting_a_chat_twice_is_404_the_second_time(alice: Caller) -> None:
    chat = alice.chat()
    assert alice.http.delete(f"/api/v1/chats/{chat['id']}").status_code == 200
    assert_error(alice.http.delete(f"/api/v1/chats/{chat['id']}"), 404, code="not_found", param="chat_id")


def test_sending_to_a_deleted_chat_is_404(alice: Caller) -> None:
    chat = alice.chat()
    alice.http.delete(f"/api/v1/chats/{chat['id']}")
    response = alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hi"})
    assert_error(response, 404, code="not_found", param="chat_id")


# --------------------------------------------------------------------------- metadata limits


def test_metadata_with_16_keys_is_accepted(alice: Caller) -> None:
    metadata = {f"k{i}": "v" for i in range(16)}
    assert alice.chat(metadata=metadata)["metadata"] == metadata


def test_metadata_with_17_keys_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"metadata": {f"k{i}": "v" for i in range(17)}})
    assert_error(response, 400, code="invalid_value", param="metadata")


def test_metadata_key_of_64_characters_is_accepted(alice: Caller) -> None:
    assert alice.chat(metadata={"k" * 64: "v"})["metadata"] == {"k" * 64: "v"}


def test_metadata_key_of_65_characters_is_400(alice: Caller) -> None:
    key = "k" * 65
    response = alice.http.post("/api/v1/chats", json={"metadata": {key: "v"}})
    assert_error(response, 400, code="invalid_value", param=f"metadata.{key}.[key]")


def test_metadata_value_of_512_characters_is_accepted(alice: Caller) -> None:
    assert alice.chat(metadata={"k": "v" * 512})["metadata"] == {"k": "v" * 512}


def test_metadata_value_of_513_characters_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"metadata": {"k": "v" * 513}})
    assert_error(response, 400, code="invalid_value", param="metadata.k")


def test_metadata_value_that_is_not_a_string_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"metadata": {"k": 1}})
    assert_error(response, 400, code="invalid_value", param="metadata.k")


def test_metadata_limits_apply_to_patch(alice: Caller) -> None:
    chat = alice.chat(metadata={"a": "b"})
    response = alice.http.patch(f"/api/v1/chats/{chat['id']}", json={"metadata": {f"k{i}": "v" for i in range(17)}})
    assert_error(response, 400, code="invalid_value", param="metadata")
    assert alice.http.get(f"/api/v1/chats/{chat['id']}").json()["metadata"] == {"a": "b"}


def test_unknown_field_in_create_body_is_400(alice: Caller) -> None:
    response = alice.http.post("/api/v1/chats", json={"title": "x", "colour": "red"})
    assert_error(
        response,
        400,
        code="invalid_value",
        param="colour",
        message="Invalid value for 'colour': Extra inputs are not permitted.",
    )
    assert _list(alice)["data"] == []
