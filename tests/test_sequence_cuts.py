"""Token shares of a one-window step cut where they cost alike (duquant.learn.sequence.cuts)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from duquant.learn.sequence import cuts, token_costs


def _config(**over) -> SimpleNamespace:
    """A Llama-shaped text config: hidden 8, 2 heads of 4 (1 KV head), intermediate 16, 3 layers."""
    base = dict(
        hidden_size=8, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, intermediate_size=16, vocab_size=10, sliding_window=None, layer_types=None,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **over})


def test_token_costs_hand_computed():
    """Per token: 3 layers x (q 8x8 + k, v 2 x 8x4 + o 8x8 + MLP 3 x 8x16 = 576) + head 10x8 =
    1,808, plus 2 x 2 heads x 4 = 16 per key read per layer; a sliding window of 2 on the middle
    layer reads at most 2 keys there."""
    got = token_costs(_config(), 5)
    assert got.tolist() == [1808 + 48 * (p + 1) for p in range(5)]
    slide = _config(
        sliding_window=2, layer_types=["full_attention", "sliding_attention", "full_attention"]
    )
    slid = token_costs(slide, 5)
    assert slid.tolist() == [1808 + 32 * (p + 1) + 16 * min(p + 1, 2) for p in range(5)]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_cuts_are_near_the_best_balance(count):
    """Brute force over every cut of 12 rising token costs: the largest share's cost is within one
    token's cost of the best possible; every share holds a token; the shares tile the window."""
    costs = torch.tensor([1.0 + 0.5 * p for p in range(12)], dtype=torch.float64)
    got = cuts(costs, count)
    assert got[0] == 0 and got[-1] == 12 and all(b > a for a, b in itertools.pairwise(got))

    def worst(bounds) -> float:
        return max(float(costs[a:b].sum()) for a, b in itertools.pairwise(bounds))

    best = min(worst((0, *inner, 12)) for inner in itertools.combinations(range(1, 12), count - 1))
    assert worst(got) <= best + float(costs.max())


def test_cuts_of_equal_costs_are_even_and_short_windows_keep_a_token_each():
    """Equal costs cut evenly; as many shares as tokens: one token each."""
    assert cuts(torch.ones(12, dtype=torch.float64), 3) == (0, 4, 8, 12)
    assert cuts(torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64), 3) == (0, 1, 2, 3)


def test_real_shapes_give_the_earlier_share_more_tokens():
    """SmolLM2-135M's shapes over 1024 tokens: the first of two shares is longer (its tokens read
    fewer keys), 542 tokens, and the shares' costs differ by less than one token's."""
    cfg = _config(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152,
    )  # fmt: skip
    costs = token_costs(cfg, 1024)
    b = cuts(costs, 2)
    assert b == (0, 542, 1024)
    first, second = float(costs[: b[1]].sum()), float(costs[b[1] :].sum())
    assert abs(first - second) < float(costs.max())
