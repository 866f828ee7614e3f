"""Benchmark of the drop-in `/v1` gateway against a bare pass-through and the LiteLLM proxy.

One run on a 2-core machine measures, for each target, one server process
pinned to CPU 0 (`taskset -c 0`), with the zero-delay fake upstream
(bench/gateway_upstream.py) and the load generator (bench/gateway_load.py,
this process) pinned to CPU 1:

- direct: the fake upstream itself, no gateway (the harness's own ceiling);
- bare: bench/gateway_bare.py, Starlette + httpx2, no auth, no accounting;
- bare-raw: the same with openai_service's own lean upstream client
  (app/services/http_client.py, asyncio + httptools) instead
  of httpx2 (what the upstream HTTP client itself costs);
- lean: openai_service (`python main.py`), SQLite in a temp dir, keys checked;
- real: openai_service on PostgreSQL (a fresh database `openai_service_bench_gw`),
  keys checked, every call recorded in the ledger;
- litellm: the LiteLLM proxy (`pip install 'litellm[proxy]'` into a scratch
  virtualenv under /tmp, never a project dependency), one worker, master key.

Figures, each the median of `--reps` repetitions:
- non-stream: server CPU per request (utime+stime of the server's process tree
  from /proc, before and after the run, divided by the count; nothing
  subtracted), requests/s and p50 latency at 32 concurrent clients;
- stream of 20 content chunks: CPU per stream and streams/s at 32 clients; time
  to first content chunk at concurrency 1, and the same minus the time straight
  from the upstream, measured just before ("TTFT added").

    .venv/bin/python bench/gateway.py --nice -10       # everything, about 12 minutes on a quiet machine
    .venv/bin/python bench/gateway.py --targets bare,lean --reps 1 --requests 500 --streams 200

`--nice -10` (root) lowers the disturbance from other work on a shared machine;
the report says how much CPU other processes used during the runs. The real
configuration needs PostgreSQL (`--pg-url`); LiteLLM is installed into
`--litellm-venv` on first use (`pip install 'litellm[proxy]'`).

Prints a markdown table and writes it to bench/results/gateway.md. Every
process it starts is stopped at the end, also on Ctrl-C or an error.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_load as load
from common import cpu_name, machine_cpu, process_cpu

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MODEL = "gpt-4o-mini"
SERVER_CPU = "0"
HARNESS_CPU = 1
PG_DATABASE = "openai_service_bench_gw"
LITELLM_MASTER_KEY = "sk-litellm-bench-master-key-0123456789"
ADMIN_KEY = "sk-admin-bench-0123456789abcdef"
TARGET_NAMES = ("bare", "bare-raw", "lean", "real", "litellm")
LABELS = {
    "direct": "direct to fake upstream (no gateway)",
    "bare": "bare pass-through (Starlette + httpx2)",
    "bare-raw": "bare pass-through (Starlette + the service's lean client)",
    "lean": "openai_service /v1, lean (SQLite)",
    "real": "openai_service /v1, real (PostgreSQL)",
    "litellm": "LiteLLM proxy",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every process the bench starts, each in its own session so it can be stopped as a group."""

    def __init__(self, logs: Path, nice: int = 0) -> None:
        self.logs = logs
        self.nice = nice
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], *, cpu: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> int:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [*(["nice", "-n", str(self.nice)] if self.nice else []), "taskset", "-c", cpu, *cmd],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.running[name] = proc
        return proc.pid

    def alive(self, name: str) -> bool:
        return name in self.running and self.running[name].poll() is None

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants."""
    tree, total, todo = _children(), 0.0, [pid]
    while todo:
        current = todo.pop()
        total += process_cpu(current)
        todo.extend(tree.get(current, ()))
    return total


def http_json(url: str, *, data: Any = None, key: str | None = None, timeout: float = 10.0) -> Any:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def wait_ready(procs: Processes, name: str, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited during startup:\n{procs.tail(name)}")
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            http_json(url, timeout=2)
            return
        time.sleep(0.25)
    raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n{procs.tail(name)}")


# --------------------------------------------------------------------------- PostgreSQL


def _pg_dsn(url: str, database: str) -> str:
    base = url.replace("postgresql+asyncpg://", "postgresql://").rstrip("/")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{database}"


async def pg_recreate(url: str, *, drop_only: bool = False) -> None:
    conn = await asyncpg.connect(_pg_dsn(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)')
        if not drop_only:
            await conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
    finally:
        await conn.close()


async def pg_backend_pids(url: str) -> list[int]:
    conn = await asyncpg.connect(_pg_dsn(url, "postgres"))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", PG_DATABASE
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def pg_count_ledger(url: str) -> int:
    conn = await asyncpg.connect(_pg_dsn(url, PG_DATABASE))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_records"))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int
    pid: int
    key: str | None
    process: str  # the name in Processes ("" for the upstream itself)
    pg_url: str | None = None  # to also count PostgreSQL backends' CPU
    version: str = ""
    sent: int = 0  # requests the load generator sent it


def start_upstream(procs: Processes) -> Target:
    port = free_port()
    pid = procs.start(
        "upstream", [sys.executable, str(BENCH / "gateway_upstream.py"), "--port", str(port)], cpu=str(HARNESS_CPU)
    )
    wait_ready(procs, "upstream", f"http://127.0.0.1:{port}/_stats", 30)
    return Target("direct", port, pid, None, "upstream")


def start_bare(procs: Processes, upstream: int, name: str = "bare") -> Target:
    port = free_port()
    cmd = [sys.executable, str(BENCH / "gateway_bare.py"), "--port", str(port), "--upstream"]
    cmd += [f"http://127.0.0.1:{upstream}/v1", "--client", "raw" if name == "bare-raw" else "httpx2"]
    pid = procs.start(name, cmd, cpu=SERVER_CPU)
    wait_ready(procs, name, f"http://127.0.0.1:{port}/healthz", 60)
    return Target(name, port, pid, None, name)


def start_service(procs: Processes, name: str, upstream: int, database_url: str, service_dir: Path = ROOT) -> Target:
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "OPENAI_API_KEY": "anything",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream}/v1",
        "ADMIN_API_KEY": ADMIN_KEY,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "warning",
        "REDIS_URL": "",
    }
    env = {k: v for k, v in env.items() if v}
    pid = procs.start(name, [sys.executable, "main.py"], cpu=SERVER_CPU, env=env, cwd=service_dir)
    base = f"http://127.0.0.1:{port}"
    wait_ready(procs, name, f"{base}/healthz", 120)
    user = http_json(f"{base}/api/v1/users", data={"name": f"bench-{name}"}, key=ADMIN_KEY)
    created = http_json(f"{base}/api/v1/users/{user['id']}/keys", data={"name": "gateway bench"}, key=ADMIN_KEY)
    return Target(name, port, pid, created["key"], name)


def install_litellm(venv: Path, timeout: float) -> str:
    """Make sure the scratch virtualenv has `litellm[proxy]`; returns its version."""
    litellm = venv / "bin" / "litellm"
    if not litellm.exists():
        log(f"installing litellm[proxy] into {venv} (scratch virtualenv, not a project dependency)")
        base = shutil.which("python3.11") or shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def start_litellm(procs: Processes, upstream: int, venv: Path, workdir: Path, version: str) -> Target:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n"
        "      api_key: anything\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n"
    )
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "WARNING", "LITELLM_TELEMETRY": "False"}
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    pid = procs.start("litellm", [*cmd, "--num_workers", "1"], cpu=SERVER_CPU, env=env)
    wait_ready(procs, "litellm", f"http://127.0.0.1:{port}/health/liveliness", 180)
    return Target("litellm", port, pid, LITELLM_MASTER_KEY, "litellm", version=version)


# --------------------------------------------------------------------------- measuring


@dataclass
class Phase:
    """One load run against one target, with the CPU it cost."""

    result: load.RunResult
    server_cpu: float  # seconds, the target's process tree
    upstream_cpu: float  # seconds, the fake upstream
    pg_cpu: float = 0.0  # seconds, PostgreSQL backends of the bench database
    others_cpu: float = 0.0  # seconds, every other process on the machine (should be ~0)

    @property
    def per_request_ms(self) -> float:
        return self.server_cpu / self.result.requests * 1000

    @property
    def others_load(self) -> float:
        """Cores used by processes outside the benchmark during the run."""
        return max(self.others_cpu, 0.0) / self.result.wall if self.result.wall else 0.0

    @property
    def harness_load(self) -> float:
        """Share of CPU 1 used by the load generator and the fake upstream."""
        return (self.result.client_cpu + self.upstream_cpu) / self.result.wall if self.result.wall else 0.0


@dataclass
class Rep:
    nonstream_c1: Phase
    nonstream: Phase
    stream_c1: Phase
    stream: Phase
    direct_ttft_ms: float


@dataclass
class Settings:
    requests: int
    streams: int
    c1_requests: int
    c1_streams: int
    concurrency: int
    reps: int
    warmup: int
    wait_quiet: float = 0.0
    settle: float = 0.3


def _pg_cpu(pids: dict[int, float]) -> float:
    return sum(process_cpu(pid) for pid in pids)


async def phase(
    target: Target, upstream: Target, *, stream: bool, requests: int, concurrency: int, settle: float
) -> Phase:
    raw = load.build_request(
        "127.0.0.1", target.port, "/v1/chat/completions", load.chat_body(MODEL, stream), target.key
    )
    pg_before: dict[int, float] = {}
    if target.pg_url:
        pg_before = {pid: process_cpu(pid) for pid in await pg_backend_pids(target.pg_url)}
    marks: dict[str, float] = {}

    def ready() -> None:
        marks["server"] = tree_cpu(target.pid)
        marks["upstream"] = process_cpu(upstream.pid)
        marks["machine"] = machine_cpu()

    result = await load.run(
        "127.0.0.1", target.port, raw, requests=requests, concurrency=concurrency, stream=stream, on_ready=ready
    )
    machine = machine_cpu() - marks["machine"]
    await asyncio.sleep(settle)  # let the tail of the work (a ledger flush, closing streams) land in the count
    server = tree_cpu(target.pid) - marks["server"]
    upstream_cpu = process_cpu(upstream.pid) - marks["upstream"]
    pg = 0.0
    if target.pg_url:
        after = {pid: process_cpu(pid) for pid in await pg_backend_pids(target.pg_url)}
        pg = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in after.items())
    if target is upstream:
        server = upstream_cpu
    target.sent += requests
    if result.errors:
        log(f"  {target.name}: {result.errors} errors, first: {result.first_error}")
    # Read before the settle pause, the machine's total is compared with the run's own CPU (a slight
    # overcount of "ours" from the settle pause only makes the figure for the others smaller).
    others = machine - (upstream_cpu if target is upstream else server + upstream_cpu) - result.client_cpu - pg
    return Phase(result, server, upstream_cpu, pg, others)


async def warm_up(target: Target, upstream: Target, s: Settings) -> None:
    for stream, count in ((False, s.warmup), (True, max(s.warmup // 4, 20))):
        await phase(target, upstream, stream=stream, requests=count, concurrency=s.concurrency, settle=0)
        await phase(target, upstream, stream=stream, requests=10, concurrency=1, settle=0)


async def wait_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Wait (at most `max_wait` seconds) until the machine's other processes use under `threshold` cores."""
    deadline = time.monotonic() + max_wait
    while True:
        before, started = machine_cpu(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (machine_cpu() - before) / (time.monotonic() - started)
        if busy < threshold:
            return
        if time.monotonic() >= deadline:
            log(f"the machine is busy with other processes ({busy:.2f} cores); measuring anyway")
            return
        log(f"waiting for other processes to calm down ({busy:.2f} cores busy)")
        await asyncio.sleep(4.0)


async def measure(target: Target, upstream: Target, s: Settings) -> list[Rep]:
    await wait_quiet(s.wait_quiet)
    log(f"{target.name}: warming up")
    await warm_up(target, upstream, s)
    reps = []
    for number in range(1, s.reps + 1):
        direct = await phase(upstream, upstream, stream=True, requests=s.c1_streams, concurrency=1, settle=0)
        common = {"settle": s.settle}
        nonstream_c1 = await phase(target, upstream, stream=False, requests=s.c1_requests, concurrency=1, **common)
        nonstream = await phase(
            target, upstream, stream=False, requests=s.requests, concurrency=s.concurrency, **common
        )
        stream_c1 = await phase(target, upstream, stream=True, requests=s.c1_streams, concurrency=1, **common)
        stream = await phase(target, upstream, stream=True, requests=s.streams, concurrency=s.concurrency, **common)
        rep = Rep(nonstream_c1, nonstream, stream_c1, stream, direct.result.ttft_p50_ms)
        reps.append(rep)
        log(
            f"{target.name} rep {number}: {nonstream.per_request_ms:.2f} ms CPU/req, {nonstream.result.rate:.0f} req/s,"
            f" {stream.per_request_ms:.2f} ms CPU/stream, {stream.result.rate:.0f} streams/s,"
            f" TTFT {stream_c1.result.ttft_p50_ms:.2f} ms (direct {rep.direct_ttft_ms:.2f} ms);"
            f" other processes {max(nonstream.others_load, stream.others_load):.2f} cores"
        )
    return reps


# --------------------------------------------------------------------------- the report


@dataclass
class Row:
    name: str
    reps: list[Rep]
    version: str = ""
    ledger_rows: int | None = None
    requests_sent: int = 0
    errors: int = 0
    notes: list[str] = field(default_factory=list)

    def med(self, pick: Callable[[Rep], float]) -> float:
        return statistics.median(pick(r) for r in self.reps)

    @property
    def cpu_req(self) -> float:
        return self.med(lambda r: r.nonstream.per_request_ms)

    @property
    def rps(self) -> float:
        return self.med(lambda r: r.nonstream.result.rate)

    @property
    def p50(self) -> float:
        return self.med(lambda r: r.nonstream.result.p50_ms)

    @property
    def p50_c1(self) -> float:
        return self.med(lambda r: r.nonstream_c1.result.p50_ms)

    @property
    def cpu_req_c1(self) -> float:
        return self.med(lambda r: r.nonstream_c1.per_request_ms)

    @property
    def cpu_stream(self) -> float:
        return self.med(lambda r: r.stream.per_request_ms)

    @property
    def cpu_stream_c1(self) -> float:
        return self.med(lambda r: r.stream_c1.per_request_ms)

    @property
    def sps(self) -> float:
        return self.med(lambda r: r.stream.result.rate)

    @property
    def ttft(self) -> float:
        return self.med(lambda r: r.stream_c1.result.ttft_p50_ms)

    @property
    def ttft_added(self) -> float:
        return self.med(lambda r: r.stream_c1.result.ttft_p50_ms - r.direct_ttft_ms)

    @property
    def overhead_header(self) -> float | None:
        values = [v for r in self.reps for v in r.nonstream_c1.result.overhead_ms]
        return statistics.median(values) if values else None

    @property
    def pg_cpu_req(self) -> float:
        return self.med(lambda r: r.nonstream.pg_cpu / r.nonstream.result.requests * 1000)

    @property
    def pg_cpu_stream(self) -> float:
        return self.med(lambda r: r.stream.pg_cpu / r.stream.result.requests * 1000)

    @property
    def harness(self) -> float:
        return max(max(r.nonstream.harness_load, r.stream.harness_load) for r in self.reps)

    @property
    def others(self) -> float:
        phases = [p for r in self.reps for p in (r.nonstream_c1, r.nonstream, r.stream_c1, r.stream)]
        return max(p.others_load for p in phases)


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _check(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(rows: dict[str, Row], s: Settings, meta: dict[str, str], skipped: dict[str, str]) -> str:
    lines = [
        "## Gateway benchmark",
        "",
        f"{meta['date']} · {meta['cpu']} · {meta['python']} · {s.reps} repetitions, medians shown · "
        f"{s.requests} non-stream requests and {s.streams} streams of 20 chunks per repetition at "
        f"{s.concurrency} clients ({s.c1_requests} and {s.c1_streams} at 1 client) · "
        f"every server is one process on CPU 0; fake upstream and load generator on CPU 1{meta['nice']}.",
        "",
        "| target | CPU ms/request | requests/s @32 | p50 ms @32 | CPU ms/stream | streams/s @32 "
        "| TTFT ms @1 | TTFT added ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("direct", *TARGET_NAMES):
        row = rows.get(name)
        if row is None:
            continue
        label = LABELS[name] + (f" {row.version}" if row.version else "")
        cpu_note = " (upstream's)" if name == "direct" else ""
        lines.append(
            f"| {label} | {_f(row.cpu_req)}{cpu_note} | {_f(row.rps, 0)} | {_f(row.p50)} | {_f(row.cpu_stream)}"
            f"{cpu_note} | {_f(row.sps, 0)} | {_f(row.ttft)} | {_f(row.ttft_added) if name != 'direct' else '—'}"
            f" | {row.errors} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {LABELS[name]} | skipped: {why} | | | | | | | |")

    busiest = max((row.others for row in rows.values()), default=0.0)
    if busiest > 0.1:
        lines += [
            "",
            f"⚠️ Other processes used up to {busiest:.2f} cores during some runs: throughput and latency "
            "figures are disturbed; CPU per request much less so.",
        ]

    lean, real, litellm, bare = rows.get("lean"), rows.get("real"), rows.get("litellm"), rows.get("bare")
    ours = [r for r in (lean, real) if r is not None]
    if ours:
        lines += ["", "| goal | " + " | ".join(r.name for r in ours) + " |", "|---|" + "---:|" * len(ours)]

        def goal(text: str, cell: Callable[[Row], str]) -> None:
            lines.append(f"| {text} | " + " | ".join(cell(r) for r in ours) + " |")

        goal("CPU per request ≤ 2 ms", lambda r: f"{_f(r.cpu_req)} ms {_check(r.cpu_req <= 2)}")
        goal("CPU per stream ≤ 4 ms", lambda r: f"{_f(r.cpu_stream)} ms {_check(r.cpu_stream <= 4)}")
        goal("TTFT added ≤ 2 ms", lambda r: f"{_f(r.ttft_added)} ms {_check(r.ttft_added <= 2)}")
        if litellm is not None:
            goal(
                "requests/s ≥ 10x LiteLLM", lambda r: f"{r.rps / litellm.rps:.1f}x {_check(r.rps >= 10 * litellm.rps)}"
            )
            goal("streams/s ≥ 10x LiteLLM", lambda r: f"{r.sps / litellm.sps:.1f}x {_check(r.sps >= 10 * litellm.sps)}")
            goal("CPU per request vs LiteLLM", lambda r: f"{litellm.cpu_req / r.cpu_req:.1f}x less")
            goal("CPU per stream vs LiteLLM", lambda r: f"{litellm.cpu_stream / r.cpu_stream:.1f}x less")
        if bare is not None:
            goal("CPU per request vs bare", lambda r: f"{r.cpu_req / bare.cpu_req:.2f}x")
            goal("CPU per stream vs bare", lambda r: f"{r.cpu_stream / bare.cpu_stream:.2f}x")
        if lean is not None and real is not None:
            ratios = {
                "CPU/request": real.cpu_req / lean.cpu_req,
                "CPU/stream": real.cpu_stream / lean.cpu_stream,
                "requests/s": lean.rps / real.rps,
                "streams/s": lean.sps / real.sps,
            }
            worst = max(ratios.values())
            text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            lines += ["", f"Real vs lean (goal: within 1.5x): {text} {_check(worst <= 1.5)}"]
            if real.ttft_added > 2 or lean.ttft_added > 2:
                lines.append(f"TTFT added, real {_f(real.ttft_added)} ms vs lean {_f(lean.ttft_added)} ms.")

    lines += [
        "",
        "<details><summary>More figures</summary>",
        "",
        "| target | p50 ms @1 | CPU ms/request @1 | CPU ms/stream @1 | x-openai-service-overhead-ms p50 @1 "
        "| PostgreSQL CPU ms/request, /stream | ledger rows / requests | CPU 1 busy (max) | other processes (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("direct", *TARGET_NAMES):
        row = rows.get(name)
        if row is None:
            continue
        pg = f"{_f(row.pg_cpu_req)}, {_f(row.pg_cpu_stream)}" if name == "real" else "—"
        ledger = f"{row.ledger_rows} / {row.requests_sent}" if row.ledger_rows is not None else "—"
        lines.append(
            f"| {name} | {_f(row.p50_c1)} | {_f(row.cpu_req_c1)} | {_f(row.cpu_stream_c1)}"
            f" | {_f(row.overhead_header, 3)} | {pg} | {ledger} | {row.harness:.0%} | {row.others:.2f} cores |"
        )
    lines += [
        "",
        "CPU 1 busy: the load generator's and the fake upstream's CPU time over the wall time of the busiest "
        "32-client run; under 100% means the harness was not the bottleneck. Other processes: CPU used on the "
        "machine by anything outside the benchmark during a run, in cores (throughput and latency are only clean "
        "near 0). The direct row's CPU columns are the fake upstream's own cost. Clients ask for streams without "
        "`include_usage`, so openai_service asks the upstream for usage and strips the usage chunk. "
        "LiteLLM runs with a master key and no database "
        "(its database mode needs Prisma engines downloaded at run time).",
        "",
        "</details>",
    ]
    for row in rows.values():
        lines += [f"- {row.name}: {note}" for note in row.notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    def raise_interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starting the bench in the background hands it SIGINT ignored.
    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def run_all(args: argparse.Namespace, procs: Processes, workdir: Path) -> str:  # noqa: PLR0912, PLR0915
    s = Settings(
        requests=args.requests,
        streams=args.streams,
        c1_requests=args.c1_requests,
        c1_streams=args.c1_streams,
        concurrency=args.concurrency,
        reps=args.reps,
        warmup=args.warmup,
        wait_quiet=args.wait_quiet,
    )
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGET_NAMES)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    skipped: dict[str, str] = {}
    litellm_version = ""
    if "litellm" in targets:
        # Installed before anything is measured: pip would steal CPU from the runs.
        started = time.monotonic()
        try:
            litellm_version = install_litellm(Path(args.litellm_venv), args.install_timeout)
            log(f"litellm {litellm_version} ready ({time.monotonic() - started:.0f}s)")
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", None)
            why = f"installation failed: {type(exc).__name__}"
            if isinstance(detail, bytes) and detail.strip():
                why += f" ({detail.decode(errors='replace').strip().splitlines()[-1][:200]})"
            log(f"LiteLLM {why}")
            skipped["litellm"] = why
            targets.remove("litellm")

    upstream = start_upstream(procs)
    rows: dict[str, Row] = {}
    reps = await measure(upstream, upstream, s)
    rows["direct"] = Row("direct", reps, errors=sum(_errors(r) for r in reps))

    for name in targets:
        base_count = await _upstream_count(upstream)
        service_dir = Path(args.service_dir)
        if name in ("bare", "bare-raw"):
            target = start_bare(procs, upstream.port, name)
        elif name == "lean":
            database = workdir / "lean" / "openai_service.db"
            target = start_service(procs, "lean", upstream.port, f"sqlite+aiosqlite:///{database}", service_dir)
        elif name == "real":
            await pg_recreate(args.pg_url)
            url = args.pg_url.rstrip("/") + "/" + PG_DATABASE
            target = start_service(procs, "real", upstream.port, url, service_dir)
            target.pg_url = args.pg_url
        else:
            target = start_litellm(procs, upstream.port, Path(args.litellm_venv), workdir, litellm_version)
        try:
            reps = await measure(target, upstream, s)
        finally:
            procs.stop(target.process)  # a clean stop drains openai_service's ledger queue
        row = Row(name, reps, version=target.version, errors=sum(_errors(r) for r in reps))
        row.requests_sent = target.sent
        upstream_calls = await _upstream_count(upstream) - base_count - s.reps * s.c1_streams
        if upstream_calls != target.sent:
            row.notes.append(f"the upstream saw {upstream_calls} calls for {target.sent} requests")
        if name == "real":
            row.ledger_rows = await pg_count_ledger(args.pg_url)
        elif name == "lean":
            row.ledger_rows = _sqlite_count(workdir / "lean" / "openai_service.db")
        if row.ledger_rows is not None and row.ledger_rows != row.requests_sent:
            row.notes.append(f"ledger has {row.ledger_rows} rows for {row.requests_sent} upstream calls")
        rows[name] = row

    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()}x {cpu_name()}",
        "python": f"Python {platform.python_version()}",
        "nice": f" (all at nice {args.nice})" if args.nice else "",
    }
    return report(rows, s, meta, skipped)


def _errors(rep: Rep) -> int:
    return sum(p.result.errors for p in (rep.nonstream_c1, rep.nonstream, rep.stream_c1, rep.stream))


async def _upstream_count(upstream: Target) -> int:
    stats = await asyncio.to_thread(http_json, f"http://127.0.0.1:{upstream.port}/_stats")
    return int(stats["requests"])


def _sqlite_count(path: Path) -> int | None:
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="comma-separated: " + ",".join(TARGET_NAMES))
    parser.add_argument("--requests", type=int, default=2000, help="non-stream requests per repetition at 32 clients")
    parser.add_argument("--streams", type=int, default=500, help="streams per repetition at 32 clients")
    parser.add_argument("--c1-requests", type=int, default=200, help="non-stream requests per repetition at 1 client")
    parser.add_argument("--c1-streams", type=int, default=100, help="streams per repetition at 1 client (TTFT)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests per target")
    parser.add_argument(
        "--wait-quiet", type=float, default=60, help="seconds to wait for other processes to go quiet per target"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for every process the bench runs (e.g. -10 as root, so that other work on a shared machine "
        "disturbs the figures less)",
    )
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/")
    parser.add_argument("--keep-db", action="store_true", help=f"keep the {PG_DATABASE} database afterwards")
    parser.add_argument("--litellm-venv", default="/tmp/litellm-venv", help="scratch virtualenv for litellm[proxy]")
    parser.add_argument("--install-timeout", type=float, default=900, help="seconds allowed for installing LiteLLM")
    parser.add_argument("--output", default=str(BENCH / "results" / "gateway.md"))
    parser.add_argument(
        "--service-dir", default=str(ROOT), help="the openai_service checkout to run as lean/real (default: this one)"
    )
    args = parser.parse_args()

    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: servers on CPU 0, upstream and load generator on CPU 1")
    os.sched_setaffinity(0, {HARNESS_CPU})
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except PermissionError:
            log(f"cannot set niceness {args.nice} (not root?); running at the default priority")
            args.nice = 0
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = Processes(workdir, args.nice)
    used_pg = "real" in args.targets
    started = time.monotonic()
    try:
        with terminate_on_signals(), load.new_runner() as runner:
            markdown = runner.run(run_all(args, procs, workdir))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        with ignoring_signals():  # a second Ctrl-C must not cut the clean-up short
            procs.stop_all()
            shutil.rmtree(workdir, ignore_errors=True)
            if used_pg and not args.keep_db:
                with contextlib.suppress(Exception), load.new_runner() as cleanup:
                    cleanup.run(pg_recreate(args.pg_url, drop_only=True))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    print(markdown)
    log(f"done in {time.monotonic() - started:.0f}s; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
