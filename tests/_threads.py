"""One torch thread for a test module: tiny models gain nothing from more, and a shared machine loses a lot to
OpenMP threads spinning at barriers while another process holds the core.

Example (a fixture)::

    @pytest.fixture(autouse=True)
    def one_thread(monkeypatch):
        with single_torch_thread(monkeypatch):
            yield
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import pytest


@contextmanager
def single_torch_thread(monkeypatch: Optional[pytest.MonkeyPatch] = None) -> Iterator[None]:
    """torch on one intra-op thread while the block runs; with ``monkeypatch``, the processes it starts too
    (``OMP_NUM_THREADS=1``, undone by the monkeypatch)."""
    import torch  # only the modules that use torch pay its import

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if monkeypatch is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
