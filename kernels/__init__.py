"""NVFP4 numerics: E2M1 codes, FP8 block scales, torch reference codec, Triton kernels."""
