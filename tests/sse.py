"""Reading the service's server-sent events in tests."""

import json
from collections.abc import Iterator
from typing import Any

import httpx2


def events(response: httpx2.Response) -> Iterator[tuple[str, Any]]:
    """(event type, parsed data) pairs; `[DONE]` comes as ("done", None)."""
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                yield "done", None
            else:
                yield event, json.loads(data)
            event = "message"


def collect(client: httpx2.Client, url: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """POST and read the whole event stream."""
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))
