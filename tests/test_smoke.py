from tests.conftest import Caller


def test_send_returns_reply_and_usage(alice: Caller) -> None:
    chat = alice.chat(title="t")
    r = alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "hello there"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["assistant_message"]["content"] == "Echo: hello there"
