"""A real OpenAI-compatible server for tests: llama.cpp's, via ``llama-cpp-python[server]``.

:class:`LlamaServer` starts ``python -m llama_cpp.server`` on a GGUF file, on 127.0.0.1 and a free
port, waits until ``/v1/models`` answers, and stops the process (and only it) on exit. Its stdout and
stderr go to a log file whose tail is quoted when the server dies or does not come up.

Facts about this server that a client must know (measured, see /work/notes/serving.md):

* ``logits_all`` must be on for any ``logprobs`` (the server's default is on).
* ``max_tokens: 0`` means *unlimited* here (OpenAI and vLLM: none with ``echo``); ask for 1.
* One model instance, requests are serialized; by default a new request *interrupts* a streaming
  one (``interrupt_requests``), so this helper turns that off.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.serving.processes import free_port, stop_process

DEFAULT_MODEL_ALIAS = "smollm2"


class LlamaServerError(RuntimeError):
    """The server could not start or died."""


def llama_cpp_server_missing_reason() -> str | None:
    """Why a llama.cpp server cannot run here, or None when it can."""
    for module in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            return (
                f"python module {module!r} missing: pip install 'llama-cpp-python[server]' "
                "(builds llama.cpp from source with cmake)"
            )
    return None


class LlamaServer:
    """A running ``llama_cpp.server`` serving one GGUF. Use as a context manager."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        alias: str = DEFAULT_MODEL_ALIAS,
        n_ctx: int = 2048,
        n_threads: int = 1,
        api_key: str | None = None,
        startup_timeout: float = 120.0,
        log_dir: str | os.PathLike | None = None,
        python: str = sys.executable,
    ) -> None:
        reason = llama_cpp_server_missing_reason()
        if reason and python == sys.executable:
            raise LlamaServerError(reason)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise LlamaServerError(f"no GGUF file at {self.model_path}")
        self.alias = alias
        self.api_key = api_key
        self.port = free_port()
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fp4roll-llama-"))
        self.log_path = self.log_dir / f"llama-server-{self.port}.log"
        command = [
            python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(n_threads),
            "--n_threads_batch",
            str(n_threads),
            "--logits_all",
            "true",
            "--interrupt_requests",
            "false",
            "--verbose",
            "false",
        ]
        if api_key:
            command += ["--api_key", api_key]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(startup_timeout)
        except Exception:
            self.close()
            raise

    @property
    def url(self) -> str:
        """Base URL without the ``/v1`` suffix."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlamaServerError(
                    f"llama.cpp server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/v1/models", headers=self.headers(), timeout=2)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise LlamaServerError(
            f"llama.cpp server on port {self.port} not ready after {timeout} s:\n{self.log_tail()}"
        )

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            stop_process(proc)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        if getattr(self, "_own_log_dir", False):
            for path in self.log_dir.glob("*"):
                path.unlink(missing_ok=True)
            self.log_dir.rmdir()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
