"""Compile every Triton kernel of neuslice for a GPU target without a GPU (Triton's bundled ptxas).

    python tests/triton_aot.py 90      # sm_90; run without TRITON_INTERPRET (the test does this)

Each kernel is compiled with the constexprs its launcher picks at the benchmark shapes, and checked
for register spills (ptxas -v). Each is compiled a second time with every integer argument equal to
1, which Triton specialises into a constant at launch (N = 1, a stride of 1, one block...), so those
paths compile too. Used by tests/test_triton.py::test_kernels_compile_for_gpu_without_one.
"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from neuslice._triton import accumulate as A
from neuslice._triton import masked_update as U
from neuslice._triton import select as S

FLOATS = {"lr", "momentum", "weight_decay", "decay", "w1", "beta2", "one_m_beta2", "eps", "step_size", "bc2_sqrt"}
acc = dict(x_ptr="*bf16", g_ptr="*bf16", r_ptr="*bf16", v_ptr="*u8", nv_ptr="*i32", order_ptr="*i64", seg_ptr="*i32",
           kept_ptr="*i32", stage_ptr="*fp32", cnt_ptr="*fp32", status_ptr="*i32")
com = dict(stage_ptr="*fp32", cnt_ptr="*fp32", label_ptr="*i64", status_ptr="*i32", count_ptr="*fp32",
           s0_ptr="*fp32", s1_ptr="*fp32", s2_ptr="*fp32", s3_ptr="*fp32")
sel = dict(s_ptr="*fp16", out_ptr="*u8", target_ptr="*fp64")
upd = dict(p_ptr="*bf16", g_ptr="*bf16", buf_ptr="*bf16", m1_ptr="*bf16", m2_ptr="*bf16", mask_ptr="*u8")


def cfg(*shape):
    return {k: v for k, v in A.default_config(*shape, interpret=False).items() if k.startswith("BLOCK")}


ALL = dict(KEEP_SUM=True, KEEP_SQ=True, KEEP_TAYLOR=True, KEEP_DL=True)
cases = [  # (kernel, pointer types, constexprs, warps) as the launchers pick them at the benchmark shapes
    (A._accumulate_kernel, acc, dict(PER_TOKEN=True, HAS_GRAD=True, HAS_REF=True, HAS_VALID=False, **ALL,
                                     **cfg(32768, 14336, 1)), 8),
    (A._accumulate_kernel, acc, dict(PER_TOKEN=False, HAS_GRAD=True, HAS_REF=True, HAS_VALID=False, **ALL,
                                     **cfg(16, 14336, 2048)), 8),
    (A._accumulate_kernel, acc, dict(PER_TOKEN=False, HAS_GRAD=False, HAS_REF=False, HAS_VALID=False,
                                     **dict(ALL, KEEP_TAYLOR=False, KEEP_DL=False), **cfg(128, 256, 196)), 8),
    # padded sequences (valid mask read per position), taylor kept alone
    (A._accumulate_kernel, acc, dict(PER_TOKEN=False, HAS_GRAD=True, HAS_REF=True, HAS_VALID=True,
                                     KEEP_SUM=False, KEEP_SQ=False, KEEP_TAYLOR=True, KEEP_DL=False,
                                     **cfg(16, 14336, 2048)), 8),
    (A._commit_kernel, com, dict(BLOCK_N=128, **ALL), 4),
    (S._select_kernel, sel, dict(TOPK=False, SINGLE=True, BLOCK=S.default_block(4096, False)), 8),
    (S._select_kernel, sel, dict(TOPK=True, SINGLE=False, BLOCK=S.default_block(65536, False)), 8),
    (U._masked_sgd_kernel, upd, dict(HAS_WD=True, HAS_MOMENTUM=True, BLOCK_R=1, BLOCK_C=1024), 4),
    (U._masked_adamw_kernel, upd, dict(BLOCK_R=1, BLOCK_C=1024), 4),
]
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(fn, ptrs, const, warps):
    sig = {a: "constexpr" if a in const else ptrs.get(a, "fp32" if a in FLOATS else "i32") for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                          target=GPUTarget("cuda", int(sys.argv[1]), 32), options=dict(num_warps=warps))


ones = 0
for fn, ptrs, const, warps in cases:
    k = compile_kernel(fn, ptrs, const, warps)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:   # ptxas -v reports register spills
        f.write(k.asm["ptx"])
        f.flush()
        arch = "sm_90a" if sys.argv[1] == "90" else "sm_" + sys.argv[1]
        usage = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull], capture_output=True,
                               text=True).stderr
    spill = int(usage.split(" bytes spill stores")[0].split()[-1])
    assert spill <= 64, (fn.__name__, const, usage)   # ptxas trades a few bytes for occupancy (16 seen)
    ints = [a for a in fn.arg_names if a not in const and a not in ptrs and a not in FLOATS]
    compile_kernel(fn, ptrs, dict(const, **{a: 1 for a in ints}), warps)
    ones += 1
print(f"compiled {len(cases)} kernels, {ones} with every integer argument specialised to 1")
