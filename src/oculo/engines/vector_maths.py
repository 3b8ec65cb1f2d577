"""The process's first call of MKL's vector maths, made on one thread before any model runs.

ATen computes a float tensor's cosine, sine, exponential and the like through MKL's vector maths
(`at::vml`), in chunks of 2,048 values split among the threads, and MKL picks its code path at
the first call. On an Intel Xeon (family 6, model 167), in about one process in ten, two threads
making that first call at once (the rotary embedding's cosines) left the second thread's half
up to 1.5e-4 off (training/README.md, "The first step was not always the same"). In training
that changed the run from its first step; in a server it can change the first request's answer
in its last bits, and evaluation's. `settle_vector_maths()` makes the first calls on one thread,
once per process: the training program calls it before its first step, `TransformersEngine`
before it loads a model.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_settled = False


def settle_vector_maths() -> None:
    """Make the process's first cosine, sine and exponential on one thread (once a process; the
    thread count is given back after)."""
    global _settled
    with _lock:
        if _settled:
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            values = torch.linspace(0.0, 100.0, 4096)
            values.cos()
            values.sin()
            values.exp()
        finally:
            torch.set_num_threads(threads)
        _settled = True
