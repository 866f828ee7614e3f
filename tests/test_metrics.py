"""Prometheus metrics: exact counts, route templates as labels, several worker processes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, Caller
from tests.fake_upstream import FakeUpstream


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def scrape(base_url: str) -> str:
    response = httpx2.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_a_send_is_counted_by_model_status_and_route(alice: Caller, service: str, upstream: FakeUpstream) -> None:
    before = scrape(service)
    chat = alice.chat()
    reply = alice.http.post(f"/api/v1/chats/{chat['id']}/messages", json={"content": "count me"}).json()
    after = scrape(service)
    usage = reply["assistant_message"]["usage"]
    labels = {"endpoint": "chat.message", "model": "gpt-4o-mini"}

    def delta(name: str, **extra: str) -> float:
        return sample(after, name, **labels | extra) - sample(before, name, **labels | extra)

    assert delta("openai_service_upstream_requests_total", status="200") == 1
    assert delta("openai_service_upstream_latency_seconds_count", status="200") == 1
    tokens = {"model": "gpt-4o-mini", "source": "reported"}
    assert (
        sample(after, "openai_service_tokens_total", kind="input", **tokens)
        - sample(before, "openai_service_tokens_total", kind="input", **tokens)
        == usage["prompt_tokens"]
    )
    route = "/api/v1/chats/{chat_id}/messages"
    http = {"method": "POST", "route": route, "status": "200"}
    assert (
        sample(after, "openai_service_http_requests_total", **http)
        - sample(before, "openai_service_http_requests_total", **http)
        == 1
    )
    # No series is labelled with an id.
    assert chat["id"] not in after


def test_metrics_add_up_across_worker_processes(tmp_path: Path, upstream: FakeUpstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'workers.db'}",
        "OPENAI_API_KEY": upstream.api_key,
        "OPENAI_BASE_URL": upstream.base_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "LOG_LEVEL": "warning",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "main.py", "serve", "--port", str(port), "--workers", "2"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 2:  # both workers up: two answers in a row on fresh connections
            try:
                ready = ready + 1 if httpx2.get(f"{base}/readyz").status_code == 200 else 0
            except httpx2.HTTPError:
                ready = 0
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        # Fresh connections each time, so the kernel spreads them over both workers.
        for _ in range(30):
            assert httpx2.get(f"{base}/healthz").status_code == 200
        # Whichever worker answers a scrape, it reports the total of all of them.
        totals = {
            sample(
                httpx2.get(f"{base}/metrics").text,
                "openai_service_http_requests_total",
                method="GET",
                route="/healthz",
                status="200",
            )
            for _ in range(8)
        }
        assert totals == {30.0}
    finally:
        process.terminate()
        process.wait(timeout=30)
