"""Compile Triton kernels for sm_90 (H100) without a GPU, in a subprocess where TRITON_INTERPRET is unset.

The interpreter runs kernels as numpy code; it cannot catch what only the compiler sees (types of loop-carried
values, ints specialised to constexpr 1, bf16 lowering).
"""

import ast
import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

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


# --- every launch, as the launchers make it ---------------------------------------------------------------------------
#
# ``compiles_for_sm90`` above compiles hand-written signatures. The functions below take them from the launchers
# instead: ``capture`` runs scenarios (calls of the public ops) under the interpreter with the kernel launch entry
# point (``InterpretedFunction.run``) replaced by a recorder, and turns each launch into what ``JITFunction.run``
# would hand to the compiler on a GPU: the signature (tensor dtype -> "*bf16", int -> "i32"/"i64", ints equal to 1 ->
# constexpr), the constexprs, the divisibility-by-16 attributes of pointers and ints and the parsed launch options
# (num_warps, num_stages, ...). It does so with Triton's own binder (``create_function_from_signature`` +
# ``JITFunction._pack_args``) for a GPUTarget("cuda", 90, 32), so the specialisation rules are Triton's, not a copy.
# The kernels themselves are not run: only their launches are recorded (the recorder returns at once), so scenarios
# may use SSLAM's real sizes where a size decides a specialisation. ``compile_launches`` then compiles each distinct
# launch for sm_90 in subprocesses without the interpreter and returns ptxas's report (registers, spills) of the
# cubin Triton built.

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
TESTS_DIR = Path(__file__).resolve().parent
SM90 = ("cuda", 90, 32)
# ``# sm_90 spills: N bytes (reason)`` in the comment block right above a kernel's decorator: the bytes of spill
# stores and of spill loads ptxas may report for that kernel (the maximum over its launches).
SPILL_COMMENT = re.compile(r"#\s*sm_90 spills:\s*(\d+)\s*bytes\s*\((.+)\)")
_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_LINE = re.compile(r"Used (\d+) registers")


def _is_triton_jit(dec) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(target, ast.Attribute) and target.attr == "jit" and getattr(target.value, "id", None) == "triton"


def _jit_defs(tree) -> dict[str, ast.FunctionDef]:
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list)
    }


def launched_kernels(kernels_dir: Path = KERNELS_DIR) -> set[tuple[str, str]]:
    """(module, kernel) of every ``@triton.jit`` function of kernels/*.py launched as ``kernel[grid](...)``."""
    found = set()
    for path in sorted(kernels_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        jit = _jit_defs(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                name = getattr(node.func.value, "id", None)
                if name in jit:
                    found.add((path.stem, name))
    return found


def allowed_spills(kernels_dir: Path = KERNELS_DIR) -> dict[tuple[str, str], tuple[int, str]]:
    """(module, kernel) -> (bytes, reason) from ``# sm_90 spills: N bytes (reason)`` comments above the kernels."""
    allowed = {}
    for path in sorted(kernels_dir.glob("*.py")):
        lines = path.read_text().splitlines()
        for name, node in _jit_defs(ast.parse("\n".join(lines))).items():
            i = min(d.lineno for d in node.decorator_list) - 2  # 0-based index of the line above the decorator
            while i >= 0 and lines[i].lstrip().startswith("#"):
                m = SPILL_COMMENT.search(lines[i])
                if m:
                    allowed[(path.stem, name)] = (int(m.group(1)), m.group(2))
                i -= 1
    return allowed


# --- capture (subprocess, TRITON_INTERPRET=1) -------------------------------------------------------------------------


def _jit_function(interpreted):
    """The JITFunction that ``triton.jit`` would have made of an interpreted kernel (same decorator arguments)."""
    from triton.runtime.jit import JITFunction

    return JITFunction(interpreted.fn, **interpreted.kwargs)


def _specialise(interpreted, args, kwargs):
    """What ``JITFunction.run`` computes before compiling, for an sm_90 target: (signature, constexprs, attrs,
    options as a dict). Mirrors run(): the debug and instrumentation defaults, then the binder and _pack_args."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(interpreted)
    backend = make_backend(GPUTarget(*SM90))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _plain(value):
    """A launch argument as plain data for the record (tensors by dtype and pointer alignment only)."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor({str(value.dtype).replace('torch.', '')}, ptr % 16 = {value.data_ptr() % 16})"
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _capture_main(scenario_module: str, out_path: str) -> None:
    """Run ``scenario_module.scenarios()`` (after its ``capture_setup()``, if any) with every kernel launch recorded
    instead of run; pickle the records."""
    import importlib

    from triton.runtime import interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1", "capture needs the interpreter"
    launches, errors, current = [], [], [None]

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        signature, constexprs, attrs, options = _specialise(self, args, kwargs)
        launches.append(
            {
                "module": self.fn.__module__.rsplit(".", 1)[-1],
                "module_path": self.fn.__module__,
                "kernel": self.fn.__name__,
                "scenario": current[0],
                "signature": signature,
                "constexprs": constexprs,
                "attrs": attrs,
                "options": options,
                "grid": tuple(grid) if isinstance(grid, (tuple, list)) else repr(grid),
                "args": [_plain(a) for a in args],
                "kwargs": {k: _plain(v) for k, v in kwargs.items()},
            }
        )
        return None

    interpreter.InterpretedFunction.run = record
    mod = importlib.import_module(scenario_module)
    if hasattr(mod, "capture_setup"):
        mod.capture_setup()
    names = []
    for name, run in mod.scenarios():
        names.append(name)
        current[0] = name
        try:
            run()
        except Exception:
            errors.append((name, traceback.format_exc()))
    with open(out_path, "wb") as f:
        pickle.dump({"launches": launches, "errors": errors, "scenarios": names}, f)


def capture(scenario_module: str, timeout: float = 300) -> dict:
    """{"launches": [...], "errors": [(scenario, traceback)]} of ``scenario_module.scenarios()``, run in a subprocess
    under the interpreter (``scenario_module`` is imported from tests/)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.pkl")
        code = (
            f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import sm90_compile; "
            f"sm90_compile._capture_main({scenario_module!r}, {out!r})"
        )
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if res.returncode != 0 or not os.path.exists(out):
            return {"launches": [], "errors": [("capture", res.stderr[-6000:])], "scenarios": []}
        with open(out, "rb") as f:
            return pickle.load(f)


def launch_key(launch: dict) -> str:
    """What makes two launches compile to the same binary: the kernel, its specialisation and its options."""
    parts = ("signature", "constexprs", "attrs", "options")
    return repr((launch["module_path"], launch["kernel"], *(sorted(launch[p].items()) for p in parts)))


def distinct_launches(launches: list[dict]) -> dict[str, dict]:
    """Readable id ``module.kernel-scenario`` -> launch, one per distinct specialisation (first scenario wins; the
    others that produced it are listed under "also")."""
    by_key, out = {}, {}
    for launch in launches:
        key = launch_key(launch)
        if key in by_key:
            by_key[key]["also"].append(launch["scenario"])
            continue
        launch = dict(launch, also=[])
        base = f"{launch['module']}.{launch['kernel']}-{launch['scenario']}"
        lid, n = base, 1
        while lid in out:  # one scenario, several specialisations of a kernel
            n += 1
            lid = f"{base}#{n}"
        by_key[key] = out[lid] = launch
    return out


# --- compile (subprocesses, no interpreter) ---------------------------------------------------------------------------


def _compile_one(launch: dict) -> dict:
    """Compile one captured launch for sm_90 as ``JITFunction._do_compile`` does, with ptxas's report captured."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module_path"]), launch["kernel"])
    src = ASTSource(fn, launch["signature"], launch["constexprs"], launch["attrs"])
    log = io.StringIO()
    # Triton runs ptxas -v on the PTX it generated and prints that report with this knob set; with no kernel
    # cache (the caller's TRITON_CACHE_DIR is fresh, and always_compile) the report is that of this very cubin.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        try:
            k = triton.compile(src, target=GPUTarget(*SM90), options=launch["options"])
        except Exception as exc:  # the compiler's message is the test's failure message
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-8000:], "log": log.getvalue()[-4000:]}
    report = log.getvalue()
    spills = _PTXAS_LINE.findall(report)
    regs = _REGS_LINE.findall(report)
    if not spills or not k.asm.get("cubin"):
        return {"ok": False, "error": "no ptxas report / cubin", "log": report[-4000:]}
    return {
        "ok": True,
        "spill_stores": max(int(s) for s, _ in spills),
        "spill_loads": max(int(ld) for _, ld in spills),
        "registers": max(int(r) for r in regs) if regs else None,
        "shared": k.metadata.shared,
        "wgmma": "wgmma" in k.asm["ptx"],
        "log": report[-3000:],
    }


def _compile_main(in_path: str, out_path: str) -> None:
    with open(in_path, "rb") as f:
        launches = pickle.load(f)
    results = {}
    for lid, launch in launches.items():
        try:
            results[lid] = _compile_one(launch)
        except Exception:
            results[lid] = {"ok": False, "error": traceback.format_exc()[-8000:], "log": ""}
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def compile_launches(launches: dict[str, dict], workers: int | None = None, timeout: float = 900) -> dict[str, dict]:
    """id -> compile result for each launch, compiled in ``workers`` parallel subprocesses without the interpreter."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(launches)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ids = list(launches)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for w in range(workers):
            part = {lid: launches[lid] for lid in ids[w::workers]}
            src, dst = os.path.join(tmp, f"in{w}.pkl"), os.path.join(tmp, f"out{w}.pkl")
            with open(src, "wb") as f:
                pickle.dump(part, f)
            code = (
                f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import sm90_compile; "
                f"sm90_compile._compile_main({src!r}, {dst!r})"
            )
            procs.append(
                (
                    part,
                    dst,
                    subprocess.Popen(
                        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    ),
                )
            )
        for part, dst, proc in procs:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode == 0 and os.path.exists(dst):
                with open(dst, "rb") as f:
                    results.update(pickle.load(f))
            else:
                for lid in part:
                    results[lid] = {"ok": False, "error": f"compile worker failed ({proc.returncode}):\n{err[-6000:]}"}
    return results
