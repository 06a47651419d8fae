"""Small shared helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


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


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at dotted path `name` under `root`; return what was there."""
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, attr)
    setattr(owner, attr, module)
    return old
