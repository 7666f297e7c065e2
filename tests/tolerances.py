"""THE tolerance table: every comparison of a backend against ``reference`` uses it.

Keys are the statistics/outputs compared, per input dtype: ``(rtol, atol)``. Loosening an entry
needs a comment with the measured error that forced it.

Sums over many elements (S positions, then B samples) may also pass at <= 2x the error of the
same sum done by torch in the input dtype (docs/architecture.md, Tests); bench/gpu_check.py applies that rule at the
GPU benchmark shapes, where fixed tolerances would not scale with the sum's length.
"""
from __future__ import annotations

import torch

# accumulate: per-class sums of per-sample means/products. float32 accumulation both sides, in
# different order (SIMD lanes vs torch's pairwise sum): ~1e-6 relative measured on the test shapes.
ACCUMULATE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-5),
    # Inputs are read as-is and accumulated in float32 by every backend: same tolerance as float32.
    torch.float16: (2e-5, 1e-5),
    torch.bfloat16: (2e-5, 1e-5),
}

# masked optimizer steps: elementwise, a few roundings; torch may fuse multiply-adds (FMA), we may not.
MASKED_UPDATE = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tol(table: dict, dtype: torch.dtype):
    return dict(zip(("rtol", "atol"), table[dtype]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype, msg: str = ""):
    torch.testing.assert_close(actual, expected, **tol(table, dtype), msg=lambda m: f"{msg}\n{m}" if msg else m)

# Profiler under torch.autocast("cpu", dtype=torch.bfloat16) against the same loop without autocast: the
# activations and gradients themselves are bf16 (8-bit mantissa), so the statistics differ by the model's
# bf16 rounding, not by accumulation (float32 per batch, float64 totals, as without autocast). Normwise:
# max|a - b| <= tol * max|b| per statistic. Measured on digits_cnn, 120 digits, 3 batches (tests/test_profiler.py):
# act_sum 2.6e-3, act_sq 4.4e-3, taylor_sum 1.6e-2; count exact.
AUTOCAST_BF16 = {"count": 0.0, "act_sum": 1e-2, "act_sq": 1.5e-2, "taylor_sum": 5e-2}


def assert_normwise_close(actual: torch.Tensor, expected: torch.Tensor, tol_: float, msg: str = ""):
    err, scale = (actual.double() - expected.double()).abs().max(), expected.double().abs().max()
    assert err <= tol_ * scale, f"{msg}: max error {float(err):.3e} > {tol_} * {float(scale):.3e}"
