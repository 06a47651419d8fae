"""Rotation search spread over ranks (duquant.pipeline._plan_block): group j planned on rank j mod W
and broadcast. A search that fails on its rank ends every rank with that error, none left waiting."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama, run_gloo_ranks

from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model


def _rank_main(rank: int, out: str) -> None:
    """One rank: quantize a tiny Llama with a rotation search that fails; write what it raised."""
    import duquant.pipeline as pipeline

    def failing(*_a, **_k):
        raise ValueError(f"search failed on rank {rank}")

    pipeline.plan_group = failing
    model = make_tiny_llama(3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    try:
        quantize_model(model, adapter_for(model), get_method("duquant++"), QuantConfig(), ids)
        msg = "no error"
    except ValueError as exc:
        msg = str(exc)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(msg)


def test_a_failed_search_ends_every_rank_with_its_error(tmp_path):
    # under the group's 60 s timeout: no rank may wait for it
    run_gloo_ranks(
        _rank_main,
        2,
        (str(tmp_path),),
        timeout_s=50,
        why="a rank waited for a plan that was never sent",
    )
    for r in range(2):  # group 0 is rank 0's: its error, on both
        assert (tmp_path / f"rank{r}.txt").read_text() == "search failed on rank 0"
