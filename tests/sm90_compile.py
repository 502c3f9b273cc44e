"""Compile Triton kernels for sm_90 (H100) without a GPU, in a subprocess where TRITON_INTERPRET is unset.

The interpreter runs kernels as numpy code; it cannot catch what only the compiler sees (types of loop-carried
values, ints specialised to constexpr 1, bf16 lowering).
"""

import subprocess
import sys

COMPILE_PROBE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sslam_fast.kernels import {module} as mod
for name, sig, consts, warps in {specs!r}:
    fn = getattr(mod, name)
    sig = dict(sig, **{{k: "constexpr" for k in consts}})
    cx = {{(fn.arg_names.index(k),): v for k, v in consts.items()}}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": warps}})
    assert k.asm["cubin"], name
print("ok")
"""


def compiles_for_sm90(module, specs):
    code = COMPILE_PROBE.format(module=module, specs=specs)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]
