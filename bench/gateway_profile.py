"""Profile one gateway target of bench/gateway.py under load with py-spy.

Starts the fake upstream and the target exactly as bench/gateway.py does
(server on CPU 0, everything else on CPU 1), warms it up, then records it with
`py-spy record` while the load generator drives it, and prints where the time
goes: the top functions by own time and by inclusive time, and the share of a
few named areas of the request path. py-spy is not a project dependency:
install it into a scratch virtualenv and pass its path.

    python3 -m venv /tmp/prof-venv && /tmp/prof-venv/bin/pip install py-spy
    .venv/bin/python bench/gateway_profile.py lean --py-spy /tmp/prof-venv/bin/py-spy [--stream] [--seconds 20]
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway as bench
import gateway_load as load

# Areas of the request path, matched against "function (file:line)" frames in this order: a sample
# belongs to the first area any of whose needles appears anywhere in its stack.
AREAS = {
    "key lookup (current_principal, DB on a cache miss)": ["current_principal"],
    "ledger writer (LedgerWriter.add / flush)": ["LedgerWriter"],
    "accounting (Accounting rows, token estimates)": ["Accounting.", "tokens.py"],
    "metrics (prometheus_client)": ["prometheus_client", "metrics.py"],
    "upstream HTTP client (httpx2 / httpcore2 / h11)": ["httpx2", "httpcore", "h11/"],
    "gateway code (app/services/gateway.py)": ["services/gateway.py"],
    "FastAPI dependency solving": ["solve_dependencies"],
    "request body read": ["Request.body", "Request.stream"],
    "rest of FastAPI / Starlette (routing, responses, error middlewares)": ["fastapi/", "starlette/"],
    "uvicorn HTTP protocol (httptools)": ["uvicorn/"],
}


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        if "select" in leaf and ("epoll" in leaf or "run_once" in leaf or "_run_once" in leaf):
            idle += count
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
        joined = stack
        for area, needles in AREAS.items():
            if any(n in joined for n in needles):
                areas[area] += count
                break
    lines = [f"{total} samples ({idle} idle in the event loop's poll)", "", "own time:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive time (frames outside the event loop machinery):"]
    skip = ("<module>", "run (", "run_until_complete", "run_forever", "_run_once", "_run (", "main (", "serve (")
    shown = 0
    for frame, count in inclusive.most_common():
        if any(s in frame for s in skip) or frame.startswith("process "):
            continue
        lines.append(f"  {count / total:6.1%}  {frame}")
        shown += 1
        if shown >= top:
            break
    rest = total - sum(areas.values())
    lines += ["", "areas (first match per stack, in the order listed in AREAS; share of all samples):"]
    lines += [f"  {c / total:6.1%}  {a}" for a, c in areas.most_common()]
    lines.append(f"  {rest / total:6.1%}  event loop, asyncio and everything else")
    return "\n".join(lines)


async def drive(target: bench.Target, upstream: bench.Target, stream: bool, concurrency: int, seconds: float) -> int:
    raw = load.build_request(
        "127.0.0.1", target.port, "/v1/chat/completions", load.chat_body(bench.MODEL, stream), target.key
    )
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        result = await load.run(
            "127.0.0.1", target.port, raw, requests=concurrency * 20, concurrency=concurrency, stream=stream
        )
        sent += result.requests
    return sent


def main() -> int:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["bare", "bare-raw", "lean", "real", "litellm"])
    parser.add_argument("--summarize", metavar="RAW", help="only summarize an existing collapsed-stack file")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/prof-venv/bin/py-spy")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="/tmp/gateway-profile", help="folder for profile.svg and profile.txt")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/")
    parser.add_argument("--litellm-venv", default="/tmp/litellm-venv")
    parser.add_argument("--service-dir", default=str(bench.ROOT), help="the openai_service checkout to profile")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize), args.top))
        return 0

    os.sched_setaffinity(0, {bench.HARNESS_CPU})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    procs = bench.Processes(workdir)
    try:
        with bench.terminate_on_signals(), load.new_runner() as runner:
            upstream = bench.start_upstream(procs)
            if args.target in ("bare", "bare-raw"):
                target = bench.start_bare(procs, upstream.port, args.target)
            elif args.target == "lean":
                url = f"sqlite+aiosqlite:///{workdir / 'lean' / 'openai_service.db'}"
                target = bench.start_service(procs, "lean", upstream.port, url, Path(args.service_dir))
            elif args.target == "real":
                runner.run(bench.pg_recreate(args.pg_url))
                target = bench.start_service(
                    procs,
                    "real",
                    upstream.port,
                    args.pg_url.rstrip("/") + "/" + bench.PG_DATABASE,
                    Path(args.service_dir),
                )
            else:
                version = bench.install_litellm(Path(args.litellm_venv), 900)
                target = bench.start_litellm(procs, upstream.port, Path(args.litellm_venv), workdir, version)
            settings = bench.Settings(0, 0, 0, 0, args.concurrency, 1, 300)
            runner.run(bench.warm_up(target, upstream, settings))
            kind = "stream" if args.stream else "nonstream"
            svg, raw = out / f"{args.target}-{kind}.svg", out / f"{args.target}-{kind}.txt"
            spy = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(bench.HARNESS_CPU),
                    args.py_spy,
                    "record",
                    "--pid",
                    str(target.pid),
                    "--rate",
                    str(args.rate),
                    "--gil",
                    "--nonblocking",
                    "--duration",
                    str(int(args.seconds)),
                    "--format",
                    "raw",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
            cpu0 = bench.tree_cpu(target.pid)
            sent = runner.run(drive(target, upstream, args.stream, args.concurrency, args.seconds - 2))
            cpu = bench.tree_cpu(target.pid) - cpu0
            _, err = spy.communicate(timeout=args.seconds + 30)
            if spy.returncode != 0:
                print(err.decode(errors="replace"), file=sys.stderr)
            print(
                f"{args.target} {kind} at {args.concurrency} clients: {sent} requests, "
                f"{cpu / max(sent, 1) * 1000:.2f} ms CPU each under py-spy (sampling adds some)\n"
            )
            print(summarize(raw, args.top))
            _to_svg(raw, svg)
            print(f"\ncollapsed stacks: {raw}\nflame graph: {svg}")
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _to_svg(raw: Path, svg: Path) -> None:
    """A flame graph from the collapsed stacks, if `flamegraph.pl` or inferno is around; else nothing."""
    for tool in ("inferno-flamegraph", "flamegraph.pl"):
        path = shutil.which(tool)
        if path:
            with raw.open("rb") as src, svg.open("wb") as dst:
                subprocess.run([path], stdin=src, stdout=dst, check=False)
            return


if __name__ == "__main__":
    sys.exit(main())
