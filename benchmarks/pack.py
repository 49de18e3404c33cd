"""CPU NVFP4 quantize+pack and dequantize: fp4roll (numba, torch) vs compressed-tensors vs a copy.

Run: ``.venv/bin/python benchmarks/pack.py [--repeats N] [--ct-repeats M]``. Median wall time
over N repeats (after one warm-up, which also JIT-compiles or loads the numba kernels) on bf16
weights of 4096x4096 and 4096x11008. Rows: each fp4roll CPU backend (``numba``: fused kernels;
``torch``: vectorized torch; ``FP4ROLL_KERNEL_BACKEND`` forced per row), compressed-tensors and
``clone``. compressed-tensors' path is what its compressor does for a weight: global scale
(``generate_gparam``), block scales (``calculate_qparams``) and ``quantize_and_pack_fp4``; for
dequantize, ``unpack_fp4_from_uint8`` and its ``dequantize``. The machine's load average is
printed before and after: timings on a shared machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import kernels

SHAPES = [(4096, 4096), (4096, 11008)]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ct_quantize_and_pack(weight: torch.Tensor):
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    global_scale = generate_gparam(weight.amin(), weight.amax())
    blocks = weight.reshape(weight.shape[0], -1, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    return quantize_and_pack_fp4(weight, scale, global_scale), scale.to(torch.float8_e4m3fn)


def ct_dequantize(packed, scale, global_scale, dtype):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    m, half_k = packed.shape
    unpacked = unpack_fp4_from_uint8(packed, m, 2 * half_k, dtype=dtype)
    return dequantize(
        x_q=unpacked, scale=scale.to(dtype), args=args, global_scale=global_scale, dtype=dtype
    )


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        previous = os.environ.get(kernels.BACKEND_ENV_VAR)
        os.environ[kernels.BACKEND_ENV_VAR] = backend
        try:
            return fn()
        finally:
            if previous is None:
                os.environ.pop(kernels.BACKEND_ENV_VAR, None)
            else:
                os.environ[kernels.BACKEND_ENV_VAR] = previous

    return run


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--ct-repeats", type=int, default=3, help="repeats for the slow rows (CT, torch)"
    )
    options = parser.parse_args()
    backends = (["numba"] if kernels.numba_available() else []) + ["torch"]
    load_before = _load()
    thread_info = ""
    if kernels.numba_available():
        import numba

        thread_info = f", numba threads: {numba.config.NUMBA_NUM_THREADS}"
    table = Table(
        title=f"NVFP4 CPU codec, bf16, median of {options.repeats} ({options.ct_repeats} for CT "
        f"and torch); torch threads: {torch.get_num_threads()}{thread_info}"
    )
    for column in ("op", "shape", "path", "ms", "CT / path", "path / clone"):
        table.add_column(column, justify="right")
    for shape in SHAPES:
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        label = "x".join(map(str, shape))
        clone = median_seconds(weight.clone, options.repeats)
        packed = kernels.quantize_nvfp4(weight)
        ops = {
            "quantize+pack": (
                lambda w=weight: kernels.quantize_nvfp4(w),
                lambda w=weight: ct_quantize_and_pack(w),
            ),
            "dequantize": (
                lambda p=packed: kernels.dequantize_nvfp4(*p, dtype=torch.bfloat16),
                lambda p=packed: ct_dequantize(*p, torch.bfloat16),
            ),
        }
        for op, (ours_fn, ct_fn) in ops.items():
            ct = median_seconds(ct_fn, options.ct_repeats)
            rows = []
            for backend in backends:
                repeats = options.repeats if backend == "numba" else options.ct_repeats
                rows.append((backend, median_seconds(_with_backend(backend, ours_fn), repeats)))
            rows += [("compressed-tensors", ct), ("clone", clone)]
            for path, seconds in rows:
                table.add_row(
                    op,
                    label,
                    path,
                    f"{seconds * 1e3:.1f}",
                    f"{ct / seconds:.1f}x",
                    f"{seconds / clone:.2f}x",
                )
            table.add_section()
    console = Console(width=110)
    console.print(table)
    console.print(f"load average (1/5/15 min): before {load_before}, after {_load()}")


if __name__ == "__main__":
    main()
