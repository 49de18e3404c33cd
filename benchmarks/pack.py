"""CPU NVFP4 quantize+pack and dequantize: fp4roll (numba, torch) vs compressed-tensors vs a copy;
and the MSE block-scale search against round-to-nearest quantize+pack.

Run: ``.venv/bin/python benchmarks/pack.py [--repeats N] [--ct-repeats M] [--only codec|search]``.
Median wall time over N repeats (after one warm-up, which also JIT-compiles or loads the numba
kernels) on bf16 weights.

Codec table (4096x4096, 4096x11008): each fp4roll CPU backend (``numba``: fused kernels;
``torch``: vectorized torch; ``FP4ROLL_KERNEL_BACKEND`` forced per row), compressed-tensors and
``clone``. compressed-tensors' path is what its compressor does for a weight: global scale
(``generate_gparam``), block scales (``calculate_qparams``) and ``quantize_and_pack_fp4``; for
dequantize, ``unpack_fp4_from_uint8`` and its ``dequantize``.

Search table (SmolLM2's 576x576 and 1536x576, and 4096x4096): ``search_nvfp4_block_scales``
with the default candidates (and Four Over Six, and with an importance vector) through numba
and through the reference, ``search+quantize`` (search, then quantize+pack under the found
scales), each against round-to-nearest quantize+pack (numba) measured in the same run. The
reference rows use the ``--ct-repeats`` count.

The machine's load average is printed before and after: timings on a shared machine are only
comparable within one run.
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
SEARCH_SHAPES = [(576, 576), (1536, 576), (4096, 4096)]


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


def search_table(options: argparse.Namespace, thread_info: str) -> Table:
    """MSE block-scale search (numba, reference) vs round-to-nearest quantize+pack."""
    table = Table(
        title=f"MSE block-scale search, bf16, median of {options.repeats} ({options.ct_repeats} "
        f"for the reference); candidates {kernels.DEFAULT_SCALE_CANDIDATES}; torch threads: "
        f"{torch.get_num_threads()}{thread_info}"
    )
    for column in ("op", "shape", "path", "ms", "path / RTN", "reference / path"):
        table.add_column(column, justify="right")
    fast = "numba" if kernels.numba_available() else "torch"
    for shape in SEARCH_SHAPES:
        generator = torch.Generator().manual_seed(1)
        weight = torch.randn(*shape, generator=generator).to(torch.bfloat16)
        importance = torch.rand(shape[1], generator=generator) ** 4
        gs = kernels.global_scale_from_amax(weight.float().abs().amax(), headroom=1.75)
        label = "x".join(map(str, shape))

        def search(w=weight, **kwargs):
            return kernels.search_nvfp4_block_scales(w, **kwargs)

        def search_and_quantize(w=weight):
            return kernels.quantize_nvfp4(w, block_scale=kernels.search_nvfp4_block_scales(w))

        rtn = median_seconds(
            _with_backend(fast, lambda w=weight: kernels.quantize_nvfp4(w)), options.repeats
        )
        ops = {
            "search": search,
            "search, importance": lambda imp=importance: search(importance=imp),
            "search, 4over6 (headroom 1.75)": lambda gs=gs: search(
                global_scale=gs, candidates=kernels.FOUR_OVER_SIX
            ),
        }
        table.add_row("quantize+pack (RTN)", label, fast, f"{rtn * 1e3:.1f}", "1.0x", "")
        for op, fn in ops.items():
            ours = median_seconds(_with_backend(fast, fn), options.repeats)
            ref = median_seconds(_with_backend("reference", fn), options.ct_repeats)
            table.add_row(
                op, label, fast, f"{ours * 1e3:.1f}", f"{ours / rtn:.1f}x", f"{ref / ours:.0f}x"
            )
            table.add_row(op, label, "reference", f"{ref * 1e3:.1f}", f"{ref / rtn:.1f}x", "1x")
        total = median_seconds(_with_backend(fast, search_and_quantize), options.repeats)
        table.add_row(
            "search+quantize", label, fast, f"{total * 1e3:.1f}", f"{total / rtn:.1f}x", ""
        )
        table.add_section()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--ct-repeats",
        type=int,
        default=3,
        help="repeats for the slow rows (CT, torch, the search's reference)",
    )
    parser.add_argument("--only", choices=("codec", "search"), default=None)
    options = parser.parse_args()
    backends = (["numba"] if kernels.numba_available() else []) + ["torch"]
    load_before = _load()
    thread_info = ""
    if kernels.numba_available():
        import numba

        thread_info = f", numba threads: {numba.config.NUMBA_NUM_THREADS}"
    console = Console(width=110)
    if options.only != "codec":
        console.print(search_table(options, thread_info))
    if options.only == "search":
        console.print(f"load average (1/5/15 min): before {load_before}, after {_load()}")
        return
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
    console.print(table)
    console.print(f"load average (1/5/15 min): before {load_before}, after {_load()}")


if __name__ == "__main__":
    main()
