"""The native boundary's argument struct (neuslice/ops/_native.py, csrc/bindings.cpp): ``_C.AccumulateArgs``
holds what each field's name says, whichever way it is built (keywords, or the ``FIELDS``-ordered tuple the
backends build on every call), and a bad value is refused naming its field."""
from __future__ import annotations

import pytest
import torch

from neuslice.ops import _dispatch

pytestmark = pytest.mark.skipif(_dispatch.import_error("cpu") is not None,
                                reason=f"neuslice._C unavailable: {_dispatch.import_error('cpu')}")

BOOLS = ("channels_last", "per_token")


def _distinct_values():
    """A value per field, each different from every other (so two fields trading places shows)."""
    from neuslice import _C
    out = {}
    for i, name in enumerate(_C.AccumulateArgs.FIELDS):
        out[name] = (i % 2 == 0) if name in BOOLS else 2 if name == "dtype" else 1000 + 7 * i
    return out


def test_fields_name_every_struct_field_once():
    from neuslice import _C
    fields = _C.AccumulateArgs.FIELDS
    assert len(fields) == len(set(fields)) == 31
    assert {"x", "g", "r", "labels", "valid", "count", "act_sum", "act_sq", "taylor_sum", "deeplift_sum",
            "ignore_index", "B", "N", "S", "K"} <= set(fields)


def test_keywords_and_fields_tuple_build_the_same_struct():
    from neuslice import _C
    vals = _distinct_values()
    by_kw = _C.AccumulateArgs(**vals).as_dict()
    by_tuple = _C.AccumulateArgs.from_fields(tuple(vals[f] for f in _C.AccumulateArgs.FIELDS)).as_dict()
    assert by_kw == by_tuple == vals


def test_accumulate_args_reads_each_tensor_into_its_own_fields():
    """Per-token labels, a per-sample ref, a valid mask and non-contiguous x and grad ([B, S, N] channels-last,
    each with its own strides): every pointer and stride lands in the field of its name."""
    from neuslice.ops._native import DTYPE_CODES, accumulate_args
    b, s, n, k = 3, 5, 4, 6
    x = torch.randn(b, n, s).transpose(1, 2)                     # [B, S, N], strides (N*S, 1, S)
    grad = torch.randn(b, s, 2 * n)[:, :, ::2]                   # strides (2*N*S, 2*N, 2)
    ref = torch.randn(b, s, n)
    labels = torch.randint(0, k, (b, 2 * s))[:, ::2]             # [B, S] per token, strides (2S, 2)
    valid = torch.ones(s, b, dtype=torch.bool).t()               # [B, S], strides (1, B)
    count = torch.zeros(k)
    act_sum, taylor_sum, deeplift_sum = torch.zeros(k, n), torch.zeros(k, n), torch.zeros(k, n)
    got = accumulate_args(x, grad, ref, labels, True, (count, act_sum, None, taylor_sum, deeplift_sum), valid,
                          -7).as_dict()
    assert got == {
        "x": x.data_ptr(), "g": grad.data_ptr(), "r": ref.data_ptr(), "labels": labels.data_ptr(),
        "dtype": DTYPE_CODES[torch.float32], "B": b, "N": n, "S": s, "K": k, "channels_last": True, "per_token": True,
        "x_sb": x.stride(0), "x_sn": x.stride(2), "x_ss": x.stride(1),
        "g_sb": grad.stride(0), "g_sn": grad.stride(2), "g_ss": grad.stride(1),
        "r_sb": ref.stride(0), "r_sn": ref.stride(2), "r_ss": ref.stride(1),
        "l_sb": labels.stride(0), "l_ss": labels.stride(1),
        "count": count.data_ptr(), "act_sum": act_sum.data_ptr(), "act_sq": 0, "taylor_sum": taylor_sum.data_ptr(),
        "deeplift_sum": deeplift_sum.data_ptr(), "valid": valid.data_ptr(), "v_sb": valid.stride(0),
        "v_ss": valid.stride(1), "ignore_index": -7}
    assert len({got["x_sb"], got["x_sn"], got["x_ss"], got["g_sb"], got["g_sn"], got["g_ss"]}) == 6


def test_bad_values_are_refused_naming_the_field():
    from neuslice import _C
    vals = _distinct_values()
    fields = _C.AccumulateArgs.FIELDS

    def tuple_with(**change):
        return tuple({**vals, **change}[f] for f in fields)

    with pytest.raises(TypeError, match="missing keyword argument 'ignore_index'"):
        _C.AccumulateArgs(**{f: v for f, v in vals.items() if f != "ignore_index"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'strides'"):
        _C.AccumulateArgs(**vals, strides=1)
    with pytest.raises(ValueError, match="expected a tuple of 31 values .*got 30"):
        _C.AccumulateArgs.from_fields(tuple_with()[:30])
    with pytest.raises(TypeError, match="channels_last must be a bool, got int"):
        _C.AccumulateArgs.from_fields(tuple_with(channels_last=1))
    with pytest.raises(TypeError, match="x_sn must be an int, got float"):
        _C.AccumulateArgs.from_fields(tuple_with(x_sn=1.0))
    with pytest.raises(TypeError, match="B must be an int, got bool"):
        _C.AccumulateArgs(**{**vals, "B": True})
    with pytest.raises(ValueError, match=r"count must lie in \[0, 2\*\*64\), got -1"):
        _C.AccumulateArgs.from_fields(tuple_with(count=-1))
    with pytest.raises(ValueError, match=rf"N must lie in \[-2\*\*63, 2\*\*63\), got {2 ** 63}"):
        _C.AccumulateArgs.from_fields(tuple_with(N=2 ** 63))
    with pytest.raises(ValueError, match=r"dtype must be a code in \[0, 3\], got 4"):
        _C.AccumulateArgs.from_fields(tuple_with(dtype=4))
