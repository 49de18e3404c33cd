"""llama.cpp as an OpenAI-compatible server on this machine (``llama-cpp-python[server]``, the
``serving`` extra): the live demo's and the serving tests' baseline and candidate endpoints.

* :class:`LlamaServer` starts ``python -m llama_cpp.server`` on a GGUF file, on 127.0.0.1 and a free
  port, waits until ``/v1/models`` answers, and stops the process (and only it) on exit. Its stdout
  and stderr go to a log file whose tail is quoted when the server dies or does not come up.
* :func:`quantize_gguf` requantizes a GGUF with llama.cpp's own ``llama_model_quantize`` (a candidate
  of another quantization type than the packaged file).
* :class:`GGUFChatTemplate` is the GGUF's own chat template (what the server applies to
  ``/v1/chat/completions``) as a :class:`calibration.prompts.PromptRenderer` tokenizer, so a stored
  calibration set holds the text the server sees.

Facts about this server that a client must know (measured, see /work/notes/serving.md):

* ``logits_all`` must be on for any ``logprobs`` (the server's default is on).
* ``max_tokens: 0`` means *unlimited* here (OpenAI and vLLM: none with ``echo``); ask for 1.
* One model instance, requests are serialized; by default a new request *interrupts* a streaming
  one (``interrupt_requests``), so this helper turns that off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from pipelines.canary.processes import free_port, stop_process

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
        self.log_dir.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------------ GGUF files


def quantize_gguf(
    source: str | os.PathLike, target: str | os.PathLike, type_name: str, *, verbose: bool = False
) -> float:
    """Write ``source`` requantized to ``type_name`` (``Q8_0``, ``Q2_K``, ... a llama.cpp
    ``LLAMA_FTYPE_MOSTLY_*`` name) to ``target``; returns the seconds it took. Requantizing a 4-bit
    source compounds: the source's error stays and the target's is added. ``verbose``: llama.cpp's
    log of every tensor (which type each one got) on stderr; otherwise only its errors."""
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log through this logger's level (set on import)
    llama_log = logging.getLogger("llama-cpp-python")
    previous_level = llama_log.level
    llama_log.setLevel(logging.DEBUG if verbose else logging.ERROR)

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp quantization type {type_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 1
    start = time.perf_counter()
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    finally:
        llama_log.setLevel(previous_level)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {code}")
    return time.perf_counter() - start


def gguf_chat_template(path: str | os.PathLike) -> str:
    """The chat template stored in a GGUF file (``tokenizer.chat_template``)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        raise LlamaServerError(f"{path} holds no tokenizer.chat_template")
    return bytes(field.parts[-1]).decode()


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """``messages`` through a GGUF chat template with the generation prompt (what the server
    renders for ``/v1/chat/completions``)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.BaseLoader(), autoescape=False)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=True)


class GGUFChatTemplate:
    """A GGUF's chat template in the shape :class:`calibration.prompts.PromptRenderer` expects of a
    tokenizer (``chat_template``, ``apply_chat_template``)."""

    def __init__(self, template: str) -> None:
        self.chat_template = template

    @classmethod
    def of(cls, path: str | os.PathLike) -> GGUFChatTemplate:
        return cls(gguf_chat_template(path))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        if tokenize or not add_generation_prompt:
            raise ValueError("a GGUF chat template renders text with the generation prompt only")
        return render_chat_template(self.chat_template, messages)
