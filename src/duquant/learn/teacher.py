"""The full-precision teacher's next-token distributions, computed once block by block and kept compactly.

Norm tweaking fits the quantized model to the full-precision one's next-token distribution. Instead of
a second copy of the model run beside the student at every step, the teacher runs once, before any
block is quantized, through the same block store as quantization (in memory or streamed from disk),
and keeps per window and token only its `k` most likely tokens' log-probabilities, their ids and the
log of the mass left outside them (`TopK`). The loss is then the KL between the two distributions
coarsened to those k tokens plus one "rest" bucket: exact when k + 1 covers the vocabulary, and a lower
bound of the full KL whose gradient differs only in how the rest's mass is spread (as the student does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from duquant import distributed as dist
from duquant.calibrate import capture_block_inputs, run_block
from duquant.models.adapters import Adapter

from . import sequence

log = logging.getLogger(__name__)

# the rest bucket's log-mass floor: exp(-80) is 0 in float32 sums, and 0·(−80 − x) stays finite
_TAIL_FLOOR = -80.0
# tokens through the head at once: [tokens, vocab] float32 logits, log-softmax and gradient are
# 1 GiB each for a 2048-token window at a 128k vocabulary, 50 MiB at 256 tokens x 49k
HEAD_CHUNK = 256


@dataclass
class TopK:
    """One window's teacher distribution: top-k log-probs and ids [seq, k], the rest's log-mass [seq]."""

    logp: Tensor
    index: Tensor
    tail: Tensor

    def rows(self, a: int, b: int) -> TopK:
        """Tokens a..b of the window."""
        return TopK(self.logp[a:b], self.index[a:b], self.tail[a:b])

    @staticmethod
    def join(parts: list[TopK], fn) -> TopK:
        """One TopK whose every field is `fn` of the parts' fields (torch.cat, a stack, ...)."""
        return TopK(*(fn([getattr(p, f) for p in parts]) for f in ("logp", "index", "tail")))


def head_logits(
    model: nn.Module, adapter: Adapter, hidden: Tensor, norm_weight: Tensor | None = None
) -> Tensor:
    """Logits from the last block's output: final norm (its weight replaced by `norm_weight` when
    given), head, and the family's final soft cap (Gemma 3's final_logit_softcapping)."""
    norm = model.get_submodule(adapter.final_norm)
    if norm_weight is None:
        x = norm(hidden)
    else:
        x = functional_call(norm, {"weight": norm_weight}, (hidden,))
    logits = model.get_submodule(adapter.lm_head)(x)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def top_k(logits: Tensor, k: int) -> TopK:
    """The compact form of one window's logits [seq, vocab]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    k = min(k, logp.shape[-1] - 1)  # k = vocab − 1 already makes the KL exact
    vals, idx = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1).clamp(min=_TAIL_FLOOR)
    return TopK(vals.contiguous(), idx.to(torch.int32), rest)


def top_k_kl(logits: Tensor, target: TopK) -> Tensor:
    """Mean over tokens of KL(teacher ‖ student) over the target's k tokens and the rest bucket,
    from the student's logits [seq, vocab]."""
    s = F.log_softmax(logits.float(), dim=-1)
    idx = target.index.to(device=s.device, dtype=torch.long)
    t_top, t_rest = target.logp.to(s.device), target.tail.to(s.device)
    s_top = s.gather(-1, idx)
    s_rest = s.scatter(-1, idx, float("-inf")).logsumexp(-1).clamp(min=_TAIL_FLOOR)
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


def _window_top_k(model: nn.Module, adapter: Adapter, hidden: Tensor, k: int) -> TopK:
    """One window's compact distribution from its last hidden state [1, seq, d], HEAD_CHUNK
    tokens of logits at a time."""
    parts = [
        top_k(head_logits(model, adapter, hidden[:, a : a + HEAD_CHUNK])[0], k)
        for a in range(0, hidden.shape[1], HEAD_CHUNK)
    ]
    return TopK.join(parts, torch.cat)


@torch.no_grad()
def window_targets(
    model: nn.Module, adapter: Adapter, store, windows: Tensor, k: int, progress: bool = False
) -> list[TopK]:
    """Each of `windows`' compact teacher distribution from the model as it is now (full
    precision), one block in memory at a time, in this process alone."""
    with store.embedding(model):
        inputs = capture_block_inputs(model, adapter, windows)
    blocks = range(len(adapter.blocks(model)))
    for i in tqdm(blocks, desc="teacher", leave=False, disable=not (progress and dist.is_main())):
        block = store.load(i)
        hidden = run_block(block, inputs)
        store.release(i)  # a full-precision block is dropped, never written
        inputs = inputs.next(hidden, i + 1)
    with store.head():
        return [_window_top_k(model, adapter, h, k) for h in inputs.hidden]


def teacher_targets(
    model: nn.Module, adapter: Adapter, store, windows: Tensor, k: int
) -> list[TopK]:
    """Each window's compact teacher distribution (`window_targets`); under torch.distributed
    each rank computes its share and every rank gets them all."""
    share = dist.shard(len(windows))
    out = window_targets(model, adapter, store, windows[share.start : share.stop], k, True)
    if not dist.active():
        return out
    # tensors, not pickled objects: 128 windows x 2048 tokens x k = 256 is 0.5 GiB
    every = TopK.join(out, lambda xs: dist.gather_cat(torch.stack(xs)))
    return [TopK(*row) for row in zip(every.logp, every.index, every.tail, strict=True)]


class LiveTargets:
    """The teacher's exact distribution of window j (k = vocab − 1: the full KL), computed when a
    step asks for it by a full-precision pass of that window alone, block by block through the
    store (the blocks are the full-precision ones between a trainer's calls): exact targets
    without keeping every window's [tokens, vocab] distribution, at one forward pass a step."""

    def __init__(self, model: nn.Module, adapter: Adapter, store, windows: Tensor):
        self.model, self.adapter, self.store, self.windows = model, adapter, store, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, j: int) -> TopK:
        with sequence.paused(self.model), torch.no_grad():  # whole windows, this rank alone
            w = self.windows[j : j + 1]
            return window_targets(self.model, self.adapter, self.store, w, EXACT)[0]


EXACT = 1 << 62  # a k no vocabulary reaches: top_k keeps vocab − 1 tokens, the KL is exact


__all__ = [
    "HEAD_CHUNK",
    "LiveTargets",
    "TopK",
    "head_logits",
    "teacher_targets",
    "top_k",
    "top_k_kl",
    "window_targets",
]
