"""Process-group facts that every part may ask (rank-0-only logging and progress bars), and how
a process that joined a group leaves.

Why leaving needs care (seen as ``terminate called without an active exception`` and SIGABRT
from a torchrun rank under load): gloo runs each collective on a C++ worker thread, which
destroys the finished work object only after the caller's ``wait()`` has returned. That object
may hold the last reference to a tensor that Python created (a barrier keeps the collectives
before it), and dropping it then takes the GIL. If the main thread has meanwhile reached
interpreter finalization, CPython (3.11) ends the worker with ``pthread_exit``, whose unwinding
through torch's ``noexcept`` frames calls ``std::terminate`` (core dump: ``ProcessGroupGloo::
runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` -> ``TensorImpl::decref_pyobject``
-> ``take_gil`` -> ``PyThread_exit_thread``). ``destroy_process_group()`` would join the workers
first, but only if nothing else still holds torch's C++ group, and after a training run something
does (the gloo threads are still alive after it returns). So a process that joined a group ends
with :func:`exit_process`: ``atexit`` handlers run while the interpreter is whole, then ``os._exit``
skips the finalization that the workers cannot survive.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from typing import NoReturn

_joined = False


def joined() -> None:
    """Record that this process joined a ``torch.distributed`` process group (see :func:`exit_process`)."""
    global _joined
    _joined = True


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``: ``sys.exit`` normally; in a process that joined a process
    group, run the ``atexit`` handlers, flush, and ``os._exit`` (see the module docstring)."""
    if not _joined:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to flush
            stream.flush()
    os._exit(code)


def rank() -> int:
    """This process's global rank under torchrun/SLURM-style launchers (0 when not launched)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch always has it
        pass
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0
