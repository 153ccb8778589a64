"""One math thread per process unless told otherwise.

The OpenMP runtime reads ``OMP_NUM_THREADS`` once, when torch is loaded, so a script that sets the
variable after its imports changes nothing (measured: torch kept 2 threads on this 2-core machine).
Every script's ``__main__`` calls :func:`one_thread_default` instead: it sets torch's intra-op threads
from ``OMP_NUM_THREADS`` (1 when unset) and leaves the variable set for the processes it starts.
"""

from __future__ import annotations

import os


def one_thread_default() -> int:
    """Sets torch's intra-op threads from ``OMP_NUM_THREADS`` (default 1); returns the number used."""
    raw = os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"OMP_NUM_THREADS={raw!r} is invalid: must be a positive integer") from None
    if n < 1:
        raise ValueError(f"OMP_NUM_THREADS={raw!r} is invalid: must be a positive integer")
    import torch

    torch.set_num_threads(n)
    return n
