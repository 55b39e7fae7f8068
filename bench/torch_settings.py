"""bench/torch_settings.py - the runtime settings of the PyTorch peers (bench/torch_*.py).

tuned:   OMP_WAIT_POLICY=PASSIVE and, on AVX-512 machines, OPENBLAS_CORETYPE=SkylakeX (Debian's
         OpenBLAS 0.3.21 may not recognise newer CPUs and fall back to SSE3 kernels); the peer
         also calls torch.set_num_threads(2).
default: none of those variables and PyTorch's own thread count ("out of the box").
The variables must be in the environment before torch (and its OpenMP and OpenBLAS) load, so
dispatch() re-executes the script with them, and runs the default setting as a child process.
"""
import os
import subprocess
import sys

TUNE_VARS = ("OMP_WAIT_POLICY", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS")


def has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def tuned_env():
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if has_avx512():
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def dispatch(script, extra, setting, run):
    """Calls run("tuned") and/or run("default") as setting says (tuned, default or both; the
    -env forms mark a re-executed process), re-running script with the arguments extra where
    the environment has to change first."""
    if setting in ("both", "tuned"):
        env = tuned_env()
        if any(os.environ.get(v) != env.get(v) for v in TUNE_VARS):
            os.execve(sys.executable, [sys.executable, script] + extra + ["--setting=" + setting + "-env"], env)
        run("tuned")
    elif setting in ("both-env", "tuned-env"):
        run("tuned")
    if setting in ("both", "both-env"):
        env = {k: v for k, v in os.environ.items() if k not in TUNE_VARS}
        sys.stdout.flush()
        subprocess.call([sys.executable, script] + extra + ["--setting=default"], env=env)
    if setting == "default":
        run("default")
