"""Precision vocabulary shared from the flow parameters to the kernels: tiers and model dtypes.

Torch-free on purpose: flow parameter models and the CLI import it, and importing torch costs seconds.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Never quantized: the output head (logit precision drives KL directly) and MoE routers (a flipped
#: expert choice is a discrete error no scale can fix): Mixtral / Qwen-MoE ``mlp.gate`` (on disk Mixtral's
#: ``block_sparse_moe.gate``), Qwen2-MoE's ``shared_expert_gate`` (a Linear [1, hidden] that gates the
#: shared expert; vLLM builds it unquantized). compressed-tensors ignore patterns.
DEFAULT_IGNORE: tuple[str, ...] = (
    "lm_head",
    r"re:.*\.(mlp|block_sparse_moe|moe)\.gate$",
    r"re:.*\.shared_expert_gate$",
    r"re:.*router.*",
)

#: Elements per NVFP4 block (16 along K); equals ``kernels.FP4_BLOCK_SIZE`` (tested).
NVFP4_BLOCK = 16


class Tier(str, Enum):
    """Precision of one fused group. A run's ``--scheme`` is the NVFP4 tier its groups start from."""

    NVFP4 = "nvfp4"  # W4A4: NVFP4 weights and inputs
    NVFP4A16 = "nvfp4a16"  # W4A16: NVFP4 weights, 16-bit inputs
    FP8 = "fp8"  # W8A8: per-channel FP8 weights, dynamic per-token FP8 inputs
    BF16 = "bf16"  # high precision, in the checkpoint's storage dtype

    @property
    def quantizes_weights(self) -> bool:
        return self is not Tier.BF16

    @property
    def quantizes_activations(self) -> bool:
        return self in (Tier.NVFP4, Tier.FP8)

    @property
    def is_nvfp4(self) -> bool:
        return self in (Tier.NVFP4, Tier.NVFP4A16)

    @property
    def preset(self) -> str | None:
        """compressed-tensors' preset scheme name (None for the high-precision tier)."""
        return {Tier.NVFP4: "NVFP4", Tier.NVFP4A16: "NVFP4A16", Tier.FP8: "FP8_DYNAMIC"}.get(self)

    @property
    def format(self) -> str | None:
        """compressed-tensors' compression format of the tier's tensors."""
        if self.is_nvfp4:
            return "nvfp4-pack-quantized"
        return "float-quantized" if self is Tier.FP8 else None

    def weight_bytes(self, out_features: int, in_features: int, storage_itemsize: int = 2) -> int:
        """Bytes one ``[out, in]`` Linear weight takes in a checkpoint under this tier, scales included."""
        if self.is_nvfp4:
            # packed codes + one FP8 scale per 16 + FP32 global scale (+ FP32 input scale for W4A4)
            scalars = 4 * (2 if self.quantizes_activations else 1)
            return out_features * (in_features // 2 + in_features // NVFP4_BLOCK) + scalars
        if self is Tier.FP8:
            return out_features * in_features + 4 * out_features
        return out_features * in_features * storage_itemsize


class Rounding(str, Enum):
    """How NVFP4 weights are rounded onto the grid (all keep the compressed-tensors format).

    ``rtn``: round-to-nearest under amax block scales (the baseline everyone has); ``mse``: block
    scales from the MSE search weighted by the input's per-channel second moment; ``gptq``: GPTQ error
    feedback under fixed round-to-nearest scales; ``gptq-mse``: GPTQ under the MSE-searched scales.
    """

    RTN = "rtn"
    MSE = "mse"
    GPTQ = "gptq"
    GPTQ_MSE = "gptq-mse"

    @property
    def searches_scales(self) -> bool:
        return self in (Rounding.MSE, Rounding.GPTQ_MSE)

    @property
    def uses_gptq(self) -> bool:
        return self in (Rounding.GPTQ, Rounding.GPTQ_MSE)

    @property
    def needs_calibration(self) -> bool:
        """True when the method reads calibration inputs (Hessians or per-channel E[x^2])."""
        return self is not Rounding.RTN


class ExpertInputScale(str, Enum):
    """Which calibrated input amax a routed expert's W4A4 ``input_global_scale`` comes from.

    ``layer`` (default): the maximum over all experts of the MoE layer (per projection). vLLM's FlashInfer
    NVFP4 MoE kernels (its first choice on Blackwell) use one input scale per layer, the max over the
    experts, whatever the checkpoint says; its CUTLASS kernel honours per-expert scales. A layer-wide scale
    computes the same on every backend, so the emulation matches what is served.
    ``expert``: each expert's own amax over the tokens routed to it (served as is only by CUTLASS).
    """

    LAYER = "layer"
    EXPERT = "expert"


#: The tiers a calibration run may start from (``--scheme``).
NVFP4_SCHEMES = (Tier.NVFP4, Tier.NVFP4A16)


class ModelDtype(str, Enum):
    """Floating-point dtypes a model is loaded, calibrated or stored in."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]

    @property
    def itemsize(self) -> int:
        return 4 if self is ModelDtype.FP32 else 2
