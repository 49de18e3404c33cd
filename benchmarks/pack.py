"""CPU NVFP4 quantize+pack and dequantize: fp4roll vs compressed-tensors vs a plain copy.

Run: ``.venv/bin/python benchmarks/pack.py [--repeats N]``. Median wall time over N repeats
(after one warm-up) on bf16 weights of 4096x4096 and 4096x11008. compressed-tensors' path is what
its compressor does for a weight: global scale (``generate_gparam``), block scales
(``calculate_qparams``) and ``quantize_and_pack_fp4``; for dequantize, ``unpack_fp4_from_uint8``
and its ``dequantize``.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    table = Table(
        title=f"NVFP4 CPU codec, bf16, median of {options.repeats} (torch threads: "
        f"{torch.get_num_threads()})"
    )
    for column in (
        "op",
        "shape",
        "fp4roll ms",
        "compressed-tensors ms",
        "clone ms",
        "CT / fp4roll",
        "fp4roll / clone",
    ):
        table.add_column(column, justify="right")
    for shape in SHAPES:
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        label = "x".join(map(str, shape))
        clone = median_seconds(weight.clone, options.repeats)
        ours = median_seconds(lambda w=weight: kernels.quantize_nvfp4(w), options.repeats)
        theirs = median_seconds(lambda w=weight: ct_quantize_and_pack(w), options.repeats)
        table.add_row(
            "quantize+pack",
            label,
            f"{ours * 1e3:.1f}",
            f"{theirs * 1e3:.1f}",
            f"{clone * 1e3:.1f}",
            f"{theirs / ours:.2f}x",
            f"{ours / clone:.1f}x",
        )
        packed = kernels.quantize_nvfp4(weight)
        ours = median_seconds(
            lambda p=packed: kernels.dequantize_nvfp4(*p, dtype=torch.bfloat16), options.repeats
        )
        theirs = median_seconds(lambda p=packed: ct_dequantize(*p, torch.bfloat16), options.repeats)
        table.add_row(
            "dequantize",
            label,
            f"{ours * 1e3:.1f}",
            f"{theirs * 1e3:.1f}",
            f"{clone * 1e3:.1f}",
            f"{theirs / ours:.2f}x",
            f"{ours / clone:.1f}x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
