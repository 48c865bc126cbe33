"""CPU threads of every compute command: `--threads N`, else `ILLADA_NUM_THREADS`, else `OMP_NUM_THREADS`, else
half the CPUs this process may use, at most 4.

torch's own default is one thread per core. On a machine that is shared (other jobs, a second run) those threads
wait on each other: generation was 20x and training 5x slower with the default than with one thread on a busy
2-core machine. Half the usable CPUs (at least 1, at most 4) leaves room for the rest of the machine; past 4 the
small matmuls of these models gain little. Pass `--threads` (or set the variable) to use more.

Torch-free at import, so `illada --help` stays fast; torch is imported when the count is applied.
"""
from __future__ import annotations

import argparse
import os

from illada.errors import IlladaError

ENV = "ILLADA_NUM_THREADS"
MAX_DEFAULT = 4
MAX_THREADS = 4096
HELP = (f"CPU threads for torch (default: ${ENV}, else $OMP_NUM_THREADS, else half the usable CPUs, at most "
        f"{MAX_DEFAULT}, so a shared machine is not oversubscribed)")


def _positive(text: str, where: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise IlladaError(f"{where}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise IlladaError(f"{where}: expected a positive integer, got {text!r}")
    if value > MAX_THREADS:  # torch takes a C int: 2**31 was an OverflowError traceback
        raise IlladaError(f"{where}: at most {MAX_THREADS} threads, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    # checked when applied (`thread_count`), so a bad value is the one-line `illada: error: ...` of every command
    parser.add_argument("--threads", default=None, metavar="N", help=HELP)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(MAX_DEFAULT, usable_cpus() // 2))


def thread_count(flag: str | int | None = None) -> tuple[int, bool]:
    """(threads, explicit): the flag, else $ILLADA_NUM_THREADS, else $OMP_NUM_THREADS, else the default.

    A bad $ILLADA_NUM_THREADS is a user error; a bad $OMP_NUM_THREADS is someone else's and is ignored."""
    if flag is not None:
        return _positive(flag, "--threads"), True
    if os.environ.get(ENV, "").strip():
        return _positive(os.environ[ENV], f"${ENV}"), True
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        omp = 0
    if omp >= 1:
        return omp, True
    return default_threads(), False


def apply_threads(flag: str | int | None = None) -> int:
    """Set torch's intra-op and inter-op thread counts (and the tokenizer's Rayon pool) before any work."""
    import torch

    threads, explicit = thread_count(flag)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable once, before the first inter-op work: a second call in one process
        pass
    if explicit:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    return threads
