"""Helpers shared by the database benchmarks (bench/context.py, bench/stats.py).

A scratch PostgreSQL database per benchmark, built with the project's own migrations;
percentiles of timing samples; markdown tables; and a line describing the machine. Not a
benchmark itself: run the scripts that import it.
"""

import asyncio
import contextlib
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
# Benchmarks drop and create their databases: only ever names with this prefix.
DATABASE_PREFIX = "openai_service_bench_"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.db.migrations import upgrade_to_head  # noqa: E402 (needs ROOT on sys.path)

# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True, slots=True)
class Database:
    """A scratch database on a PostgreSQL server reached as `server` (postgresql://user@host:port)."""

    server: str
    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(rf"{DATABASE_PREFIX}[a-z0-9_]+", self.name):
            raise ValueError(f"benchmark databases must be named {DATABASE_PREFIX}<a-z0-9_>, not {self.name!r}")

    @property
    def dsn(self) -> str:
        """For asyncpg."""
        return f"{self.server.rstrip('/')}/{self.name}"

    @property
    def url(self) -> str:
        """For SQLAlchemy and the app's settings."""
        return self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def exists(self) -> bool:
        conn = await asyncpg.connect(f"{self.server.rstrip('/')}/postgres")
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.name))
        finally:
            await conn.close()

    async def recreate(self) -> None:
        """Drop (disconnecting its sessions) and create the database, empty."""
        conn = await asyncpg.connect(f"{self.server.rstrip('/')}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()

    def migrate(self) -> None:
        """Build the schema with the project's Alembic migrations (blocking: call outside an event loop)."""
        upgrade_to_head(self.url)

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)


async def server_info(db: Database) -> str:
    """PostgreSQL's version and the settings that matter most to these benchmarks."""
    conn = await db.connect()
    try:
        version = str(await conn.fetchval("SHOW server_version")).split(" ")[0]
        settings = [f"{name} {await conn.fetchval(f'SHOW {name}')}" for name in ("shared_buffers", "work_mem", "jit")]
    finally:
        await conn.close()
    return f"PostgreSQL {version} ({', '.join(settings)})"


# --------------------------------------------------------------------------- machine load

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu(pid: int) -> float:
    """CPU seconds (utime + stime, all threads) of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def backend_pids(db: Database) -> list[int]:
    """The PostgreSQL server processes serving connections to `db` (this benchmark's own)."""
    conn = await asyncpg.connect(f"{db.server.rstrip('/')}/postgres")
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", db.name)
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def wait_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait, at most `max_wait` seconds, until the machine uses under `threshold` cores; the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        before, started = machine_cpu(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (machine_cpu() - before) / (time.monotonic() - started)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        print(f"waiting for other processes to calm down ({busy:.2f} cores busy)", file=sys.stderr)
        await asyncio.sleep(2.0)


class LoadProbe:
    """How many cores processes other than this one and its PostgreSQL backends used meanwhile.

    `pids` are the backends serving this benchmark (`backend_pids`), read when `start` is called:
    open the connections first. Other sessions of the server (other people's tests) count as other.
    """

    def __init__(self) -> None:
        self._pids: list[int] = []
        self._start = (0.0, 0.0, 0.0, 0.0)

    def _sample(self) -> tuple[float, float, float, float]:
        own = os.times()
        return (
            time.monotonic(),
            machine_cpu(),
            own.user + own.system,
            sum(process_cpu(pid) for pid in self._pids),
        )

    def start(self, pids: list[int]) -> None:
        self._pids = pids
        self._start = self._sample()

    def stop(self) -> "Load":
        now = self._sample()
        wall, machine, own, backends = (b - a for a, b in zip(self._start, now, strict=True))
        return Load(own / wall, backends / wall, max(machine - own - backends, 0.0) / wall)


@dataclass(frozen=True, slots=True)
class Load:
    """Average cores used during a measurement."""

    own: float
    backends: float
    others: float

    def line(self) -> str:
        text = (
            f"During the measurement this process used {self.own:.2f} cores, its PostgreSQL backends "
            f"{self.backends:.2f}, and other processes {self.others:.2f} (of {os.cpu_count()})."
        )
        if self.others > 0.2:
            text += " ⚠️ The machine was shared: absolute times are inflated; ratios measured in the same run less so."
        return text


# --------------------------------------------------------------------------- timing


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, PostgreSQL's percentile_cont)."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Timing:
    """Summary of samples, in the samples' unit."""

    n: int
    p50: float
    p95: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> "Timing":
        values = sorted(samples)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            len(values),
            percentile(values, 0.5),
            percentile(values, 0.95),
            percentile(values, 0.99),
            values[0],
            values[-1],
        )


# --------------------------------------------------------------------------- reporting


def fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def check(ok: bool) -> str:
    return "✅" if ok else "❌"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    """A markdown table; `align` is one letter per column, `l` or `r` (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line(pg_info: str) -> str:
    """Date, CPU, cores, Python and PostgreSQL, for the top of a result file."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{date} · {cpu_name()}, {os.cpu_count()} cores · Python {platform.python_version()} · "
        f"{pg_info}, on the same machine"
    )


def write_result(name: str, text: str) -> Path:
    """Write bench/results/<name>.md and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path
