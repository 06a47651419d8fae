"""Transforms and methods: exact invertibility, unchanged FP logits, greedy search properties, folding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama, transformed_fp_logits

from duquant.methods import RECIPES, get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import QuantLinear
from duquant.transforms.base import BlockRotation, ChannelScale, Permutation, Sequence
from duquant.transforms.hadamard import KroneckerHadamard, hadamard, paley, random_signs, sylvester
from duquant.transforms.permutation import zigzag_permutation
from duquant.transforms.rotation import greedy_rotation, helmert_spread, random_spread


def outlier_llama(tie: bool = False):
    """Tiny Llama (head_dim 64, GQA, intermediate 384) with injected massive activation channels."""
    m = make_tiny_llama(
        seed=1,
        hidden_size=256,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    with torch.no_grad():
        m.model.embed_tokens.weight[:, [3, 77]] *= 40.0  # residual-stream outliers
        for layer in m.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
            layer.mlp.up_proj.weight[[5, 200]] *= 30.0  # down_proj-input outliers
    return m


def _orth_err(r: torch.Tensor) -> float:
    return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())


@pytest.mark.parametrize("n", [2, 12, 20, 28, 32, 36, 64, 384, 576, 1536])
def test_hadamard_is_orthogonal_with_unit_entries(n):
    h = hadamard(n)
    assert _orth_err(h) < 1e-12
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_paley_and_sylvester_are_hadamard():
    for h in (paley(12), paley(36), sylvester(16)):
        n = h.shape[0]
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    with pytest.raises(ValueError):
        paley(10)


def test_kronecker_hadamard_matches_dense_and_inverts():
    gen = torch.Generator().manual_seed(0)
    t = KroneckerHadamard(576, random_signs(576, gen))
    x = torch.randn(7, 576, dtype=torch.float64)
    dense = t.matrix().double()
    assert torch.allclose(t(x.float()).double(), x @ dense, atol=1e-4)
    assert torch.allclose(t.inverse(t(x.float())).double(), x, atol=1e-4)
    assert _orth_err(dense) < 1e-5


def _check_transform(t, k: int) -> None:
    """x A A^-1 = x and (x A)(W A^-T)^T = x W^T (transforms hold float32 buffers)."""
    x, w = torch.randn(9, k, dtype=torch.float64), torch.randn(5, k, dtype=torch.float64)
    assert torch.allclose(t.inverse(t(x)), x, atol=1e-5)
    assert torch.allclose(t(x) @ t.weight(w).T, x @ w.T, atol=1e-4)


def test_each_transform_is_exactly_invertible_and_preserves_products():
    gen = torch.Generator().manual_seed(0)
    k = 64
    steps = [
        ChannelScale(torch.rand(k, dtype=torch.float64) + 0.1),
        BlockRotation(random_spread(32, gen)),
        BlockRotation(torch.stack([random_spread(32, gen), random_spread(32, gen)])),
        Permutation(torch.randperm(k, generator=gen)),
    ]
    for t in steps:
        _check_transform(t, k)
    _check_transform(Sequence(steps), k)


def test_helmert_spread_spreads_channel_zero():
    r = helmert_spread(32)
    assert _orth_err(r) < 1e-12
    assert torch.allclose(r[0], torch.full((32,), 32**-0.5, dtype=r.dtype))
    e0 = torch.zeros(32, dtype=r.dtype)
    e0[0] = 1.0
    assert torch.allclose((e0 @ r).abs(), torch.full((32,), 32**-0.5, dtype=r.dtype))


def test_greedy_rotation_is_orthogonal_lowers_peak_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, 37] *= 60.0  # one outlier channel in block 1
    peak = float(x.abs().max())
    r1, info = greedy_rotation(x, 32, 64, generator=torch.Generator().manual_seed(5))
    r2, _ = greedy_rotation(x, 32, 64, generator=torch.Generator().manual_seed(5))
    assert _orth_err(r1) < 1e-10
    assert torch.equal(r1, r2)
    rotated = BlockRotation(r1)(x.double())
    assert float(rotated.abs().max()) < 0.5 * peak
    assert info["steps"] >= 1 and info["best"] < info["start"]


def _greedy_reference(x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """The search written plainly: |m|.argmax() for the outlier, a global aminmax for the range."""
    from duquant.transforms.rotation import _swap

    gen = torch.Generator().manual_seed(seed)
    m = x.float().reshape(-1, 32)
    cur = torch.eye(32, dtype=torch.float64)
    base = random_spread(32, gen)
    lo, hi = torch.aminmax(m)
    best_obj, best = float(hi - lo), cur.clone()
    for _ in range(steps):
        k = int(m.abs().argmax()) % 32
        r = _swap(base, k)
        cur, m = cur @ r, m @ r.float()
        lo, hi = torch.aminmax(m)
        if float(hi - lo) < best_obj:
            best_obj, best = float(hi - lo), cur.clone()
    return best


def test_greedy_rotation_matches_the_plain_search():
    # the fast search (numpy argmax/argmin) must pick the same outliers, ties included: integer
    # activations make +v and -v maxima and repeated maxima common
    gen = torch.Generator().manual_seed(1)
    for x in (
        torch.randn(64, 96, generator=gen) * torch.logspace(0, 2, 96),
        torch.randint(-3, 4, (40, 64), generator=gen).float(),
    ):
        r, _ = greedy_rotation(x, 32, 24, generator=torch.Generator().manual_seed(7))
        assert torch.equal(r, _greedy_reference(x, 24, 7))


def test_greedy_rotation_keeps_identity_when_nothing_helps():
    x = torch.zeros(8, 32)
    x[:, 0] = 1.0
    x[:, 1:] = 1.0  # already flat: every rotation can only raise the range
    r, info = greedy_rotation(x, 32, 16)
    assert info["steps"] == 0 and torch.equal(r, torch.eye(32, dtype=r.dtype))


def test_zigzag_balances_block_maxima():
    m = torch.tensor([float(2**i) for i in range(16)])
    perm = zigzag_permutation(m, 4)
    assert sorted(perm.tolist()) == list(range(16))
    block_max = m[perm].reshape(4, 4).amax(dim=1)
    contiguous_max = m.reshape(4, 4).amax(dim=1)
    assert block_max.max() == contiguous_max.max()  # the top channel stays where it must
    # every block receives one of the four largest channels
    assert sorted(block_max.tolist()) == sorted(m.topk(4).values.tolist())


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("tie", [False, True])
def test_every_method_leaves_fp_logits_unchanged(name, tie):
    base = outlier_llama(tie)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    ref, out, m = transformed_fp_logits(base, name, ids, max_steps=24)
    assert torch.allclose(out, ref, atol=2e-4 * ref.abs().max()), float((out - ref).abs().max())
    if name != "fp":
        assert all(isinstance(blk.mlp.down_proj, QuantLinear) for blk in m.model.layers)


def test_duquantpp_folds_what_is_foldable():
    m = outlier_llama()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    rep = quantize_model(
        m, adapter_for(m), get_method("duquant++", max_steps=8), QuantConfig(None, None), ids
    )
    plans = rep.plans[0]
    # Λ folds into the norms and up_proj, Λ and R of the o_proj input into v_proj (head_dim 64)
    assert plans["o"].online is None and len(plans["o"].folded) == 2
    for g in ("qkv", "gate_up", "down"):
        assert [type(s) for s in plans[g].online.steps] == [BlockRotation]
        assert [type(s) for s in plans[g].folded] == [ChannelScale]


@pytest.mark.parametrize("name", ["duquant++", "duquant", "smooth+hadamard"])
def test_folded_equals_unfolded(name):
    # exact in full precision; once quantized, a fold into a producer (v_proj, up_proj) changes that
    # producer's own weight quantization, so only the FP model is required to match
    base = outlier_llama()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    outs = []
    for fold in (True, False):
        m = copy.deepcopy(base)
        method = get_method(name, max_steps=8, fold=fold)
        rep = quantize_model(m, adapter_for(m), method, QuantConfig(None, None), ids)
        with torch.no_grad():
            outs.append(m(ids).logits)
        assert any(p.folded for p in rep.plans[0].values()) == fold
    assert torch.allclose(outs[0], outs[1], atol=2e-4 * outs[1].abs().max())


def test_methods_are_deterministic_with_a_seed():
    base = outlier_llama()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        m = copy.deepcopy(base)
        quantize_model(
            m, adapter_for(m), get_method("duquant++", max_steps=8), QuantConfig(), ids, seed=3
        )
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert torch.equal(outs[0], outs[1])


def test_online_flops_match_a_hand_count():
    from duquant.pipeline import online_flops_per_token

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    flops = {}
    for name in ("rtn", "duquant++", "duquant"):
        m = outlier_llama()  # hidden 256, intermediate 384, head_dim 64, 2 layers
        quantize_model(m, adapter_for(m), get_method(name, max_steps=4), QuantConfig(), ids)
        flops[name] = online_flops_per_token(m)
    # duquant++: one 32x32 block matmul (2*K*32) on the q/k/v, gate/up and down inputs; o folds into v
    per_layer = 2 * 256 * 32 + 2 * 256 * 32 + 2 * 384 * 32
    assert flops == {
        "rtn": 0,
        "duquant++": 2 * per_layer,
        # v1: two rotations on those three inputs, plus the o input's second rotation (its
        # permutation keeps it online; the first rotation and Λ fold into v_proj)
        "duquant": 2 * (2 * per_layer + 2 * 256 * 32),
    }


def test_block_rotation_moves_with_its_module() -> None:
    # nn.Module.to / .double / .cuda go through Module._apply: a transform must not shadow it
    rot = BlockRotation(torch.eye(32))
    seq = Sequence([rot]).double()
    assert rot.rotation.dtype == torch.float64
    x = torch.randn(2, 64, dtype=torch.float64)
    assert torch.equal(seq(x), x)
