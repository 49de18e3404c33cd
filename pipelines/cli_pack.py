"""`fp4roll pack` (uncalibrated W4A16 NVFP4 checkpoint) and `fp4roll models prepare ...`."""

from __future__ import annotations

import logging
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from calibration.precision import ModelDtype, Tier

logger = logging.getLogger(__name__)
console = Console()

models_app = typer.Typer(
    name="models", help="Prepare local models (nothing is downloaded).", no_args_is_help=True
)


class PreparableModel(str, Enum):
    smollm2 = "smollm2"


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def pack(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Local Hugging Face causal LM folder (safetensors).", show_default=False
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write the NVFP4 checkpoint.", show_default=False)
    ],
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            help="Extra layers to keep high precision (compressed-tensors patterns: a module name "
            "or suffix, or 're:<regex>'). Repeatable. lm_head and MoE routers are always kept.",
        ),
    ] = None,
    scheme: Annotated[
        Tier,
        typer.Option(
            "--scheme",
            help="nvfp4a16 (W4A16 NVFP4, weights only) or fp8 (W8A8 FP8: per-channel weights, "
            "dynamic per-token activations). W4A4 'nvfp4' needs calibrated activation scales, "
            "which pack does not have: use `fp4roll recalibrate`.",
        ),
    ] = Tier.NVFP4A16,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Accept pickled .bin/.pt weights (can run arbitrary code)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR (atomically) if it exists.")
    ] = False,
    dtype: Annotated[
        ModelDtype, typer.Option("--dtype", help="Dtype of the layers kept high precision.")
    ] = ModelDtype.BF16,
) -> None:
    """Quantize every Linear of MODEL_DIR to NVFP4 W4A16 and write a compressed-tensors checkpoint (nvfp4-pack-quantized, loadable by vLLM) to OUT_DIR, atomically.

    Fused groups (q/k/v, gate/up) share one global scale; layers whose in_features is not a multiple of 16 stay high precision and are listed. No calibration happens here: for W4A4 or a KL-driven fallback plan, run `fp4roll recalibrate`.
    """
    from calibration.checkpoint import CheckpointError, export_checkpoint
    from calibration.emulate import EmulationError, quantize_groups
    from calibration.groups import DEFAULT_IGNORE, select_targets
    from calibration.models import ModelLoadError, load_causal_lm
    from kernels import NVFP4Error

    if scheme not in (Tier.NVFP4A16, Tier.FP8):
        console.print(
            f"[red]error:[/red] `pack` writes nvfp4a16 or fp8 checkpoints, not {scheme.value}. W4A4 "
            "('nvfp4') needs activation amax from calibration data: run `fp4roll recalibrate`."
        )
        raise typer.Exit(code=2)
    if out_dir.exists() and not overwrite:
        console.print(f"[red]error:[/red] {out_dir} already exists; pass --overwrite to replace it")
        raise typer.Exit(code=1)

    started = time.perf_counter()
    try:
        loaded = load_causal_lm(model_dir, dtype=dtype, device="cpu", allow_pickle=allow_pickle)
        selection = select_targets(loaded.model, (*DEFAULT_IGNORE, *(ignore or ())))
        quantized = quantize_groups(loaded.model, selection.groups, scheme)
        summary = export_checkpoint(
            loaded.model,
            out_dir,
            quantized,
            skipped=selection.skipped,
            source_dir=model_dir,
            overwrite=overwrite,
            dtype=dtype.torch_dtype,
        )
    except (ModelLoadError, CheckpointError, EmulationError, NVFP4Error, FileExistsError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    elapsed = time.perf_counter() - started

    table = Table(title=f"fp4roll pack → {out_dir}", show_lines=False)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("scheme", f"{scheme.value} ({scheme.format})")
    table.add_row(
        "quantized Linear layers",
        f"{len(summary.quantized_layers)} in {summary.group_count} groups",
    )
    table.add_row("kept high precision", str(len(summary.skipped)))
    table.add_row("size before", _mb(summary.bytes_before))
    table.add_row(
        "size after", f"{_mb(summary.bytes_after)} ({summary.compression_ratio:.2f}x smaller)"
    )
    table.add_row("shards", str(summary.shard_count))
    table.add_row("time", f"{elapsed:.1f} s (export {summary.seconds:.1f} s)")
    console.print(table)
    if summary.skipped:
        skipped = Table(title="kept high precision")
        skipped.add_column("layer")
        skipped.add_column("reason")
        for name, reason in summary.skipped.items():
            skipped.add_row(name, reason)
        console.print(skipped)


@models_app.command("prepare")
def prepare(
    name: Annotated[PreparableModel, typer.Argument(help="Model to prepare.")],
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Target folder (default $FP4ROLL_HOME/models/<name>)."),
    ] = None,
) -> None:
    """Convert a bundled model to a local safetensors folder (once) and print the folder."""
    from calibration.models import ModelLoadError, prepare_smollm2

    try:
        path = prepare_smollm2(cache_dir)
    except ModelLoadError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root CLI."""
    app.command("pack")(pack)
    app.add_typer(models_app, name="models")
