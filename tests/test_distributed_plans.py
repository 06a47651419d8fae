"""Rotation search spread over ranks (duquant.pipeline._plan_block): group j planned on rank j mod W
and broadcast. A search that fails on its rank ends every rank with that error, none left waiting."""

from __future__ import annotations

import datetime
import socket
import time

import torch
import torch.multiprocessing as mp
from conftest import make_tiny_llama

from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank: quantize a tiny Llama with a rotation search that fails; write what it raised."""
    import torch.distributed as tdist

    import duquant.pipeline as pipeline

    def failing(*_a, **_k):
        raise ValueError(f"search failed on rank {rank}")

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    pipeline.plan_group = failing
    model = make_tiny_llama(3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    try:
        quantize_model(model, adapter_for(model), get_method("duquant++"), QuantConfig(), ids)
        msg = "no error"
    except ValueError as exc:
        msg = str(exc)
    finally:
        tdist.destroy_process_group()
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(msg)


def test_a_failed_search_ends_every_rank_with_its_error(tmp_path):
    ctx = mp.start_processes(
        _rank_main,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 50  # under the group's 60 s timeout: no rank may wait for it
    try:
        while not ctx.join(timeout=1.0):
            assert time.monotonic() < deadline, "a rank waited for a plan that was never sent"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    for r in range(2):  # group 0 is rank 0's: its error, on both
        assert (tmp_path / f"rank{r}.txt").read_text() == "search failed on rank 0"
