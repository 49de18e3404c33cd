"""calibration.memory: returning freed heap pages is safe to call at any point."""

from __future__ import annotations

import torch

from calibration.memory import release_free_memory


def test_release_free_memory_keeps_live_tensors_intact():
    live = torch.arange(1 << 20, dtype=torch.float32)
    garbage = [torch.randn(256, 1024) for _ in range(16)]
    del garbage
    release_free_memory()
    release_free_memory()
    assert torch.equal(live, torch.arange(1 << 20, dtype=torch.float32))
