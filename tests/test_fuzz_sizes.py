"""Absurd sizes are refused with a Python exception that names an argument: never a crash, a hang or a huge allocation.

Every int argument of every op the C++ extension registers (the ``m.def`` schemas in csrc/*.cpp, parsed here so that
a new op or argument cannot be left out) and every size argument of the public ops gets each of ``SIZES``, one
argument at a time, the others valid. A segfault kills the interpreter, so the calls run in a child process that
prints a marker before and after each call; when the child dies or hangs, the call with a start marker and no end
marker is the culprit, it is reported, and a new child goes on with the next call. The child also runs under an
address-space limit, so that an attempted huge allocation fails at once (and is reported) instead of exhausting the
machine. Accepted outcomes: the call returns (a valid size), or it raises ValueError / RuntimeError (TORCH_CHECK)
whose message names one of the op's arguments; MemoryError, torch.OutOfMemoryError, an allocator failure, KeyError,
ZeroDivisionError and the like fail the test.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from sslam_fast import _backend

ROOT = Path(__file__).resolve().parents[1]
SIZES = [0, 1, -1, -2, -(2**31), -(2**63), 2**31 - 1, 2**31, 2**32, 2**63 - 1]
CHILD_TIMEOUT_S = 30  # per child process; a hanging call is named from its start marker
ADDRESS_SPACE_LIMIT = 24 << 30  # bytes of virtual memory for the child: torch + the valid calls fit comfortably
needs_cpp = pytest.mark.skipif(not _backend.extension_has("fbank"), reason="sslam_fast._C not built")


# --- the calls (run in the child) -------------------------------------------------------------------------------------
# CALLS[case](arg, value) runs op `case` with its valid base arguments, `arg` replaced by `value`. ARGS[case] lists
# the size arguments fuzzed and NAMES[case] the words an error message may use to name the op's arguments.

CHILD = r'''
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
import sslam_fast.ops as ops
from sslam_fast import _backend
from sslam_fast.reference import kaldi_fbank as fref

C = torch.ops.sslam_fast
CC = torch.ops.sslam_fast_C
g = torch.Generator().manual_seed(0)


def with_arg(kw, arg, value):
    for name in arg.split(","):  # "H,W": both at once, so that their product can wrap
        kw[name] = value
    return kw
wave = torch.randn(2, 800, generator=g) * 0.1
lengths = torch.tensor([800, 700])


def fbank(arg, value):
    kw = with_arg(dict(frame_length=400, frame_shift=160, n_fft=512, num_frames=3, out_frames=4), arg, value)
    window, banks = fref.hanning(400, "cpu"), fref.mel_banks(128, 512, 16000, "cpu")
    return CC.fbank(wave, lengths, torch.zeros(2), window, banks, kw["frame_length"], kw["frame_shift"],
                    kw["n_fft"], kw["num_frames"], kw["out_frames"], 0.0, 1.0)


def inverse_block_mask_cpp(arg, value):
    kw = with_arg(dict(rows=6, H=64, W=8, n_centers=5, mask_length=5, keep=102, seed=7), arg, value)
    return CC.inverse_block_mask(*kw.values())


def inverse_block_mask_cpp_raw(arg, value):  # keep = -1 (no fix-up) and one centre: no keep <= H * W to trip over
    kw = with_arg(dict(rows=1, H=64, W=8, n_centers=1, mask_length=5, keep=-1, seed=0), arg, value)
    return CC.inverse_block_mask(*kw.values())


pred, target, mask = torch.randn(6, 5, 8), torch.randn(2, 5, 8), torch.rand(6, 5) < 0.5


def masked_mse_cpp(arg, value):
    return CC.masked_mse(pred, target, mask, value)


def masked_mse_backward_cpp(arg, value):
    return CC.masked_mse_backward(torch.tensor(1.0), pred, target, mask, value)


def inverse_block_mask(arg, value):
    kw = with_arg(dict(batch_size=2, clones=3, H=64, W=8, mask_length=5), arg, value)
    return ops.inverse_block_mask(kw["batch_size"], kw["clones"], grid=(kw["H"], kw["W"]),
                                  mask_length=kw["mask_length"], generator=g)


def inverse_block_mask_op(arg, value):  # the custom op itself, as torch.ops exposes it
    kw = with_arg(dict(batch_size=2, clones=3, H=64, W=8, n_centers=5, mask_length=5, keep=102), arg, value)
    backend = "cpp" if _backend.extension_has("inverse_block_mask") else "reference"
    return C.inverse_block_mask(*kw.values(), 7, torch.device("cpu"), backend)


def kaldi_fbank(arg, value):
    kw = with_arg(dict(sample_rate=16000, num_mel_bins=128), arg, value)
    return ops.kaldi_fbank(wave, lengths, **kw)


def kaldi_fbank_op(arg, value):
    kw = with_arg(dict(num_frames=3, sample_rate=16000, num_mel_bins=128), arg, value)
    return C.kaldi_fbank(wave, lengths, kw["num_frames"], kw["sample_rate"], kw["num_mel_bins"], "auto:cpp")


def eat_features(arg, value):
    kw = with_arg(dict(sample_rate=16000, target_length=16), arg, value)
    return ops.eat_features(wave, lengths, **kw)


def eat_features_op(arg, value):
    return C.eat_features(wave, lengths, value, -4.268, 4.569, torch.float32, "auto:cpp")


x3 = torch.randn(2, 10, 8)
ids_keep = torch.arange(4).repeat(6, 1)


def clone_gather(arg, value):
    return ops.clone_gather(x3, ids_keep, value, torch.zeros(8), torch.ones(8), torch.zeros(8))


def masked_mse(arg, value):
    return ops.masked_mse(pred, target, mask, clones=value)


def partial_max_mix(arg, value):
    return ops.partial_max_mix(torch.randn(2, 1, 40, 4), (0, 20), window_frames=value)


def sample_mix_windows(arg, value):
    kw = with_arg(dict(num_frames=1024, window_frames=240, step=16), arg, value)
    return ops.sample_mix_windows(g, **kw)


def layer_targets(arg, value):
    return ops.layer_targets(torch.randn(3, 2, 5, 8), value)


for case, arg, value in json.loads(sys.stdin.read()):
    print(f"START {case} {arg} {value}", flush=True)
    try:
        globals()[case](arg, value)
        outcome = {"type": "ok", "message": ""}
    except BaseException as exc:  # noqa: BLE001 - every outcome is reported to the parent, which judges it
        mro = [c.__name__ for c in type(exc).__mro__]
        outcome = {"type": type(exc).__name__, "mro": mro, "message": str(exc)[:2000]}
    print("END " + json.dumps(outcome), flush=True)
'''

ARGS = {
    # C++ ops: filled in from the csrc schemas by cpp_int_args() (checked against this table)
    "fbank": ["frame_length", "frame_shift", "n_fft", "num_frames", "out_frames"],
    "inverse_block_mask_cpp": ["rows", "H", "W", "n_centers", "mask_length", "keep", "seed"],
    "masked_mse_cpp": ["clones"],
    "masked_mse_backward_cpp": ["clones"],
    "inverse_block_mask_cpp_raw": [],  # pairs only (PAIRS)
    # public ops (grid given as its two sizes H, W)
    "inverse_block_mask": ["batch_size", "clones", "H", "W", "mask_length"],
    "kaldi_fbank": ["sample_rate", "num_mel_bins"],
    "eat_features": ["sample_rate", "target_length"],
    "clone_gather": ["clones"],
    "masked_mse": ["clones"],
    "partial_max_mix": ["window_frames"],
    "sample_mix_windows": ["num_frames", "window_frames", "step"],
    "layer_targets": ["top_k"],
    # the Python custom ops that allocate from their ints, called as torch.ops exposes them
    "inverse_block_mask_op": ["batch_size", "clones", "H", "W", "n_centers", "mask_length", "keep"],
    "kaldi_fbank_op": ["num_frames", "sample_rate", "num_mel_bins"],
    "eat_features_op": ["target_length"],
}
# C++ op (torch.ops.sslam_fast_C.<op>) -> its case here (the public ops of the same name have cases of their own)
CPP_CASES = {"fbank": "fbank", "inverse_block_mask": "inverse_block_mask_cpp", "masked_mse": "masked_mse_cpp",
             "masked_mse_backward": "masked_mse_backward_cpp"}
# Words an error may use to name an argument of the case (besides the argument names themselves).
EXTRA_NAMES = {
    "inverse_block_mask_cpp_raw": ["rows", "H", "W"],
    "inverse_block_mask": ["grid"],
    "inverse_block_mask_op": ["grid"],
    "fbank": ["mel_banks", "window"],
    "masked_mse_cpp": ["target"],
    "masked_mse_backward_cpp": ["target"],
    "partial_max_mix": ["windows"],
}
# Products: both factors at once (2**32 x 2**32 wraps int64 to 0, (2**63 - 1)^2 to 1).
PAIRS = {
    "inverse_block_mask_cpp": ["H,W", "rows,H", "rows,W"],
    # the reproduction: (1, 2**32, 2**32, 1, 5, -1, 0) wrapped H * W to 0 and passed every check (exit 139)
    "inverse_block_mask_cpp_raw": ["H,W", "rows,H", "rows,W"],
    "inverse_block_mask": ["H,W", "batch_size,clones"],
    "inverse_block_mask_op": ["H,W", "batch_size,clones"],
    "fbank": ["num_frames,out_frames"],
}
EXTRA_VALUES = {
    # a rate under the cap whose torchaudio resampling filter to 16 kHz would be 16000 x 1e6 float64 (128 GB)
    ("eat_features", "sample_rate"): [1_000_003],
}


def cpp_int_args() -> dict[str, list[str]]:
    """op -> its int arguments, from every ``m.def("...")`` schema in csrc/*.cpp (adjacent literals joined)."""
    found = {}
    for src in sorted((ROOT / "csrc").glob("*.cpp")):
        text = src.read_text()
        for call in re.finditer(r"m\.def\(((?:\s*\"(?:[^\"\\]|\\.)*\")+)\s*\)", text):
            schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call.group(1)))
            name, args = re.match(r"\s*(\w+)\((.*)\)\s*->", schema).groups()
            found[name] = re.findall(r"\bint\s+(\w+)", args)
    return found


def test_every_cpp_op_with_int_arguments_is_fuzzed():
    schemas = cpp_int_args()
    assert {"fbank", "inverse_block_mask", "masked_mse", "ln_gelu_residual"} <= set(schemas)
    with_ints = {op: args for op, args in schemas.items() if args}
    assert set(with_ints) == set(CPP_CASES), "CPP_CASES misses a C++ op with int arguments, or has a stale one"
    for op, args in with_ints.items():
        assert ARGS[CPP_CASES[op]] == args, f"{op}: fuzzed {ARGS[CPP_CASES[op]]}, schema has {args}"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_calls(calls: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], dict]:
    """Run the calls in child processes; return each call's outcome. A child that dies or hangs marks its current
    call as crashed / hung, and a new child goes on with the rest."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSLAM_FAST_BACKEND", "SSLAM_FAST_CHECK")}
    outcomes: dict[tuple[str, str, int], dict] = {}
    todo = list(calls)
    while todo:
        try:
            res = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(todo), capture_output=True, text=True,
                                 timeout=CHILD_TIMEOUT_S, env=env, cwd=ROOT, preexec_fn=_limit_memory)
            stdout, rc, hung = res.stdout, res.returncode, False
            stderr = res.stderr
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            rc, hung = None, True
        done = 0
        current = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                current = todo[done]
            elif line.startswith("END ") and current is not None:
                outcomes[current] = json.loads(line[4:])
                done += 1
                current = None
        if current is None and done == len(todo) and rc == 0:
            break
        if current is None:  # died between calls (import failure, interpreter exit): nothing more can run
            pytest.fail(f"the fuzz child failed outside a call (rc={rc}, hung={hung}):\n{stderr[-3000:]}")
        outcomes[current] = {"type": "HANG" if hung else f"CRASH (exit {rc})", "message": stderr[-1000:]}
        todo = todo[done + 1:]
    return outcomes


def _all_calls() -> list[tuple[str, str, int]]:
    calls = []
    for case, args in ARGS.items():
        for arg in args + PAIRS.get(case, []):
            for value in SIZES + EXTRA_VALUES.get((case, arg), []):
                calls.append((case, arg, value))
    return calls


def _acceptable(case: str, outcome: dict) -> bool:
    if outcome["type"] == "ok":
        return True
    mro = outcome.get("mro", [])
    if "OutOfMemoryError" in mro or "MemoryError" in mro:
        return False
    if not ({"ValueError", "RuntimeError"} & set(mro)):
        return False
    message = outcome["message"]
    if "alloc" in message.lower():  # "DefaultCPUAllocator: can't allocate memory": refused too late
        return False
    names = ARGS[case] + EXTRA_NAMES.get(case, [])
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


@needs_cpp
def test_absurd_sizes_raise_named_errors_without_crashing():
    calls = _all_calls()
    outcomes = run_calls(calls)
    bad = [f"{case}({arg}={value}): {outcomes[case, arg, value]['type']}: {outcomes[case, arg, value]['message'][:300]}"
           for case, arg, value in calls if not _acceptable(case, outcomes[case, arg, value])]
    assert not bad, f"{len(bad)} of {len(calls)} calls crashed, hung or raised the wrong error:\n" + "\n".join(bad)
    # the fuzz reached the checks: the absurd values are refused, the valid small ones are not all refused
    for case, args in ARGS.items():
        for arg in args:
            if (case, arg) == ("inverse_block_mask_cpp", "seed"):
                continue  # any seed is valid
            assert outcomes[case, arg, 2**63 - 1]["type"] != "ok", (case, arg)
    assert all(outcomes["inverse_block_mask", a, 1]["type"] == "ok" for a in ("batch_size", "clones", "mask_length"))


def test_the_harness_names_a_crashing_call():
    """The child's crash detection itself: a call that kills the interpreter is reported as that call."""
    global CHILD
    saved = CHILD
    CHILD = CHILD.replace("def layer_targets(arg, value):\n",
                          "def layer_targets(arg, value):\n    if value == 5:\n        import os; os.abort()\n")
    try:
        outcomes = run_calls([("layer_targets", "top_k", 1), ("layer_targets", "top_k", 5),
                              ("layer_targets", "top_k", 2)])
    finally:
        CHILD = saved
    assert outcomes["layer_targets", "top_k", 1]["type"] == "ok"
    assert outcomes["layer_targets", "top_k", 5]["type"].startswith("CRASH")
    assert outcomes["layer_targets", "top_k", 2]["type"] == "ok"  # a new child went on after the crash
