"""Every Triton kernel of the hybrid op compiles to a GPU binary, on a machine with no GPU.

The interpreter (tests/kernels/test_triton.py) proves the maths but accepts code the compiler
refuses (it read plain module globals, for one). Triton ships ptxas, so each kernel is compiled
here down to a cubin for an H100-class target (sm_90) in every mode, for bf16 and fp32 inputs, in
a child process without TRITON_INTERPRET (which this process has set).
"""

import os
import subprocess
import sys

FLOAT_SCALARS = ("scale", "norm_eps", "eps")
INPUTS = ("Q", "QM", "KA", "VA", "KM", "VM", "OUT")  # tensors in the inputs' dtype; the rest are float32


def compile_all_kernels(arch: int = 90) -> list[str]:
    """Compile each kernel for ``arch``; returns one line per compiled variant."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_bwd, triton_fwd

    target = GPUTarget("cuda", arch, 32)
    done = []

    def build(kernel, dtype, **constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in FLOAT_SCALARS:
                signature[name] = "fp32"
            elif name.islower() or name in ("T", "T_padded", "NC", "H"):
                signature[name] = "i32"
            else:
                signature[name] = "*" + (dtype if name in INPUTS else "fp32")
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target)
        assert compiled.asm["cubin"], kernel.__name__
        done.append(f"{kernel.__name__} {dtype} {constexprs.get('MODE', '')} {constexprs.get('MEMORY_NORM', '')}")

    shapes = dict(D=64, DV=64, BLOCK_D=64, BLOCK_DV=64, L=64)
    dot = {"bf16": tl.bfloat16, "fp32": tl.float32}
    # the gate combination (MODE 2) with and without the memory's RMS norm; the others never norm
    variants = [(0, False), (1, False), (2, True), (2, False), (3, False)]
    for mode, memory_norm in variants:
        build(triton_fwd.hybrid_fwd_kernel, "bf16", **shapes, MODE=mode, HAS_NORM_WEIGHT=memory_norm,
              MEMORY_NORM=memory_norm, DOT_DTYPE=tl.bfloat16)
        build(triton_bwd.combine_bwd_kernel, "bf16", DV=64, BLOCK_DV=64, L=64, MODE=mode,
              HAS_NORM_WEIGHT=memory_norm, MEMORY_NORM=memory_norm)
    build(triton_fwd.hybrid_fwd_kernel, "fp32", **shapes, MODE=2, HAS_NORM_WEIGHT=False, MEMORY_NORM=False,
          DOT_DTYPE=tl.float32)
    for dtype in ("bf16", "fp32"):
        build(triton_bwd.mlstm_bwd_kernel, dtype, **shapes, DOT_DTYPE=dot[dtype])
    build(triton_bwd.attention_bwd_dq_kernel, "bf16", **shapes, DOT_DTYPE=tl.bfloat16)
    build(triton_bwd.attention_bwd_dkdv_kernel, "bf16", **shapes, DOT_DTYPE=tl.bfloat16)
    return done


def test_every_kernel_compiles_for_a_gpu_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_triton_compile import compile_all_kernels\n"
            "print('\\n'.join(compile_all_kernels()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = done.stdout.strip().splitlines()
    assert len(compiled) == 15, compiled
