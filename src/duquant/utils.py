"""Small shared helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: on loops of tiny ops, thread hand-offs cost more than they
    save (10x slower measured on 2 busy cores for (24576, 32) @ (32, 32))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
