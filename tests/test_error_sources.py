"""benchmarks/error_sources.py on a tiny random Llama: the recorded unquantized weights restore the
FP model exactly, the local split and the model-level variants are consistent."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import error_sources as es  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

from duquant.models import LoadedModel  # noqa: E402


def _args(weights: str) -> object:
    """The command line of a tiny run."""
    return es.parser().parse_args(
        ["--weights", weights, "--nsamples", "4", "--calib-seqlen", "32", "--eval-seqlen", "32"]
    )


def _windows(n: int, seed: int) -> torch.Tensor:
    """Random token windows of the tiny vocabulary."""
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", ["gptq", "rtn"])
def test_switching_off_restores_fp(weights):
    """Every position switched off (no activation QDQ, the recorded unquantized transformed
    weights) gives the FP model's logits: the reference of every measured error is exact."""
    model = make_tiny_llama()
    fp = copy.deepcopy(model)
    loaded = LoadedModel(model, None, "tiny")
    store, info, _ = es.quantize(_args(weights), loaded, _windows(4, 1))
    units = es.units_of(model, store)
    assert len(units) == 2 * 4 and {u.position for u in units} == {"qkv", "o", "gate_up", "down"}
    ids = _windows(1, 2)
    with torch.no_grad():
        ref = fp(ids).logits
        on = model(ids).logits
        for u in units:
            u.set(False, False)
        off = model(ids).logits
    assert not torch.allclose(on, ref, atol=1e-3)
    torch.testing.assert_close(off, ref, atol=2e-5, rtol=1e-4)
    assert all(torch.equal(lin.module.weight.data, lin.w_fp) for u in units for lin in u.linears)


def test_run_is_consistent():
    """Local errors are positive and 'both' is the layer's real output error; the last layer cut
    and W4A4 are the same model; W4A4's PPL is duquant's perplexity of the quantized model."""
    from duquant.eval.perplexity import perplexity

    model = make_tiny_llama()
    args = _args("gptq")
    result = es.run(args, LoadedModel(model, None, "tiny"), _windows(2, 3), _windows(4, 1))
    assert len(result["local"]) == 8 and len(result["block_output_error"]) == 2
    for row in result["local"]:
        assert row["act"] > 0 and row["weight"] > 0 and row["both"] > 0
    ml = result["model_level"]
    full = ml["W4A4 (everything quantized)"]
    assert ml["blocks 0..1"] == full
    assert full["kl"] > ml["block 0 only"]["kl"] > 0
    ppl = perplexity(model, _windows(2, 3).reshape(-1), 32)["ppl"]
    assert full["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert "| qkv |" in es.markdown(result)
