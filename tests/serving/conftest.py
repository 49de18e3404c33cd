"""Session fixtures of the serving tests: requantized GGUFs and llama.cpp servers, each started
once (lazily) and shared by every module that uses them (tests/serving/test_canary_live.py, the
live canary flow in tests/serving/test_canary_flow.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.canary.llamacpp import LlamaServer, quantize_gguf
from pipelines.demo_live import LIVE_DEMO, SERVED_MODEL


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    from calibration.models import ModelLoadError, smollm2_gguf_path

    try:
        source = smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("gguf")
    files = {"baseline": source}
    for type_name in ("Q8_0", "Q2_K"):
        files[type_name] = folder / f"smollm2-{type_name}.gguf"
        quantize_gguf(source, files[type_name], type_name)
    return files


class _Servers:
    """Lazily started llama.cpp servers, one per GGUF, for the session."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.running: dict[str, LlamaServer] = {}

    def __getitem__(self, name: str) -> LlamaServer:
        if name not in self.running:
            self.running[name] = LlamaServer(
                self.files[name], alias=SERVED_MODEL, n_ctx=LIVE_DEMO.n_ctx
            )
        return self.running[name]

    def close(self) -> None:
        for server in self.running.values():
            server.close()


@pytest.fixture(scope="session")
def servers(gguf_files):
    pool = _Servers(gguf_files)
    try:
        yield pool
    finally:
        pool.close()
