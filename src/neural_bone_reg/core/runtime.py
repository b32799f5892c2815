"""The process's runtime environment: torch threads, the allocator, the package cache folder.

Threads and the allocator are set once, deliberately, by each front end at start-up.

A perception node shares its CPU with a whole robot stack. torch's default (one intra-op
thread per core, busy-waiting OpenMP workers) collapses when another job holds a core, so the
nodes, the CLI and the benchmarks set the pools here, at start-up, from their parameters.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)

#: 0 for a thread count means: choose automatically (see :func:`default_intra_op_threads`).
AUTO = 0
#: Never more intra-op threads than this by default: the solver's tensors are small, so more
#: threads add synchronisation, not speed.
MAX_DEFAULT_INTRA_OP_THREADS = 4
#: By default the solver takes this share of the CPUs it may use, leaving the rest to the robot
#: stack: OpenMP workers busy-wait, so a pool as large as the machine collapses as soon as
#: another job holds a core (measured on 2 cores, another 2-thread job running: one thread
#: 5 s, two threads 20-35 s for the same registration).
DEFAULT_CPU_SHARE = 0.5
#: Hard upper bound of either setting.
MAX_THREADS = 256
#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap instead of a fresh mmap (glibc's 64-bit maximum).
MMAP_THRESHOLD_BYTES = 32 * 1024 ** 2
#: Freed memory at the top of the heap up to this much stays with the process.
TRIM_THRESHOLD_BYTES = 512 * 1024 ** 2


def default_intra_op_threads() -> int:
    """Return the automatic intra-op thread count: half the CPUs this process may use, 1-4."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        available = os.cpu_count() or 1
    return max(1, min(int(available * DEFAULT_CPU_SHARE), MAX_DEFAULT_INTRA_OP_THREADS))


def check_threads(intra_op: int, inter_op: int) -> None:
    """Raise ValueError unless both counts are integers in [0, MAX_THREADS] (0 = auto)."""
    for name, value in (('intra_op', intra_op), ('inter_op', inter_op)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THREADS:
            raise ValueError(f'threads.{name} must be an integer in [0, {MAX_THREADS}] '
                             f'(0 = auto), got {value!r}')


def configure_threads(intra_op: int = AUTO, inter_op: int = AUTO) -> tuple[int, int]:
    """Set torch's intra-op and inter-op pools; return the counts in use.

    ``inter_op`` can only be set before torch runs its first parallel region; a later call
    keeps the current inter-op pool and says so in the log. Call it at start-up. It also
    calls :func:`keep_freed_memory`.
    """
    import torch

    check_threads(intra_op, inter_op)
    keep_freed_memory()
    intra = intra_op or default_intra_op_threads()
    if torch.get_num_threads() != intra:
        torch.set_num_threads(intra)
    inter = inter_op or 1  # the solver runs one graph at a time: no inter-op parallelism
    if torch.get_num_interop_threads() != inter:
        try:
            torch.set_num_interop_threads(inter)
        except RuntimeError as exc:  # torch allows this once, before parallel work started
            LOG.info('keeping %d inter-op threads: %s', torch.get_num_interop_threads(), exc)
    return torch.get_num_threads(), torch.get_num_interop_threads()


def keep_freed_memory() -> bool:
    """Keep the solver's freed work buffers in the process instead of handing them to the OS.

    A registration allocates and frees (points x hypotheses) tensors of 0.1-3 MB thousands of
    times. glibc serves such blocks with a fresh mmap once its adaptive threshold is passed and
    returns a freed heap top to the OS, so each buffer is page-faulted in again: measured on
    2 cores, a grid lookup with its gradient for 131k points takes 27 ms that way and 12 ms
    with the thresholds here (the process keeps up to ``TRIM_THRESHOLD_BYTES`` it freed).
    Returns whether the thresholds were set (False where the C library is not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # pragma: no cover - not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def default_cache_dir() -> Path:
    """Return the package cache folder (``$NEURAL_BONE_REG_CACHE`` or ~/.cache/neural_bone_reg)."""
    env = os.environ.get('NEURAL_BONE_REG_CACHE')
    return Path(env) if env else Path.home() / '.cache' / 'neural_bone_reg'
