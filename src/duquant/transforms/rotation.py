"""DuQuant's outlier-aware block rotation, found by a greedy search on calibration activations.

Each step takes the largest-magnitude entry of the (rows, B) view of the activations, builds the
rotation that spreads its channel evenly over the block (a Helmert-type matrix whose first row is
uniform, with random mixing of the other columns, its channel swapped to position 0) and applies it;
after `max_steps` steps the prefix with the smallest objective is kept (possibly none). The product of
the steps is a single B x B orthogonal matrix shared by every block (`per_block` searches one per block).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from duquant.formats import QuantSpec
from duquant.utils import single_thread

OBJECTIVES = ("range", "mx")


def helmert_spread(n: int) -> Tensor:
    """Orthogonal n x n matrix whose row 0 is (1/√n)·1: x·R spreads channel 0 evenly over all n."""
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        c, s = 1.0 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        g = torch.eye(n, dtype=torch.float64)
        g[i, i] = g[i + 1, i + 1] = c
        g[i, i + 1], g[i + 1, i] = -s, s
        r = g @ r
    perm = torch.arange(n)
    perm[0], perm[-1] = n - 1, 0
    return r[perm][:, perm]


def random_spread(n: int, generator: torch.Generator) -> Tensor:
    """Helmert spread times diag(1, Q') with Q' a random orthogonal matrix (DuQuant's `get_rot`)."""
    q, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64))
    mix = torch.eye(n, dtype=torch.float64)
    mix[1:, 1:] = q
    return helmert_spread(n) @ mix


def _swap(r: Tensor, k: int) -> Tensor:
    """E_k · R · E_k: R with rows and columns 0 and k exchanged."""
    if k == 0:
        return r
    perm = torch.arange(r.shape[0])
    perm[0], perm[k] = k, 0
    return r[perm][:, perm]


def _peaks(m: Tensor) -> tuple[int, int]:
    """Flat indices of the first maximum and the first minimum of `m`.

    numpy's argmax/argmin are SIMD loops, an order of magnitude faster on CPU than torch's (and than
    `abs().argmax()`); from the two follow both the range objective and the largest |entry|.
    """
    if m.device.type == "cpu":
        a = m.numpy()
        return int(a.argmax()), int(a.argmin())
    return int(m.argmax()), int(m.argmin())


def _argmax_abs(m: Tensor, hi: int, lo: int) -> int:
    """Flat index of the first largest |entry| given the first max `hi` and min `lo` (as
    `m.abs().argmax()`: on a tie between +v and −v the earlier index)."""
    flat = m.view(-1)
    vhi, vlo = float(flat[hi]), -float(flat[lo])
    return hi if vhi > vlo else lo if vlo > vhi else min(hi, lo)


def _rel_err(m: Tensor, spec: QuantSpec) -> Tensor:
    """‖Q(m) − m‖² / ‖m‖² over the whole tensor."""
    return (spec.fake_quant(m) - m).pow(2).sum() / m.pow(2).sum().clamp(min=1e-30)


def _objective(
    m: Tensor, kind: str, spec: QuantSpec | None, w: Tensor | None, w_spec: QuantSpec | None = None
) -> float:
    """Search objective of rotated rows `m` (and rotated weight rows `w`): peak range or MX error."""
    if kind == "range":
        lo, hi = torch.aminmax(m)
        return float(hi - lo)
    err = _rel_err(m, spec)
    if w is not None:
        err = err + _rel_err(w, w_spec or spec)
    return float(err)


def best_start(
    x: Tensor,
    candidates: list[Tensor],
    spec: QuantSpec,
    weight: Tensor | None = None,
    w_spec: QuantSpec | None = None,
) -> tuple[int, list[float]]:
    """Index of the B x B rotation among `candidates` with the smallest MX error of x·R (and W·R)."""
    b = candidates[0].shape[0]
    m = x.float().reshape(-1, b)
    w = None if weight is None else weight.float().reshape(-1, b)
    with single_thread():
        errs = [
            _objective(m @ r.float(), "mx", spec, None if w is None else w @ r.float(), w_spec)
            for r in candidates
        ]
    return min(range(len(errs)), key=errs.__getitem__), errs


def greedy_rotation(*args, **kwargs) -> tuple[Tensor, dict]:
    """Search one B x B rotation for activation rows `x` (rows, K); see `_greedy_rotation`."""
    with single_thread():
        return _greedy_rotation(*args, **kwargs)


def _greedy_rotation(
    x: Tensor,
    block_size: int = 32,
    max_steps: int = 128,
    generator: torch.Generator | None = None,
    objective: str = "range",
    start: Tensor | None = None,
    weight: Tensor | None = None,
    spec: QuantSpec | None = None,
    w_spec: QuantSpec | None = None,
) -> tuple[Tensor, dict]:
    """Search one B x B rotation for activation rows `x` (rows, K); returns (R, info).

    `start` is an initial rotation (e.g. a randomized Hadamard) refined by the search; `weight`
    (out, K) rows join the `mx` objective, which needs `spec` (the activation format).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "mx" and spec is None:
        raise ValueError("the mx objective needs the quantization spec")
    gen = generator or torch.Generator().manual_seed(0)
    b = block_size
    # rows in float32 (the search only ranks candidates); the 32 x 32 product accumulates in float64
    m = x.float().reshape(-1, b)
    w = None if weight is None else weight.float().reshape(-1, b)
    cur = torch.eye(b, dtype=torch.float64) if start is None else start.double()
    m = m @ cur.float()
    w = None if w is None else w @ cur.float()
    base = random_spread(b, gen)
    fast = objective == "range"
    hi, lo = _peaks(m)
    best_obj = (
        float(m.view(-1)[hi] - m.view(-1)[lo])
        if fast
        else _objective(m, objective, spec, w, w_spec)
    )
    best_steps, best, first_obj = 0, cur.clone(), best_obj
    for step in range(1, max_steps + 1):
        # the column (channel within the block) of the largest |entry| picks the swap
        k = _argmax_abs(m, hi, lo) % b
        r_step = _swap(base, k)
        cur = cur @ r_step
        m = m @ r_step.float()
        if w is not None:
            w = w @ r_step.float()
        hi, lo = _peaks(m)
        if fast:  # the same float32 difference as a global aminmax gives
            obj = float(m.view(-1)[hi] - m.view(-1)[lo])
        else:
            obj = _objective(m, objective, spec, w, w_spec)
        if obj < best_obj:
            best_obj, best_steps, best = obj, step, cur.clone()
    return best, {"steps": best_steps, "objective": objective, "start": first_obj, "best": best_obj}


def per_block_greedy(x: Tensor, weight: Tensor | None = None, **kw) -> tuple[Tensor, dict]:
    """One greedy rotation per B-wide block of channels: (K/B, B, B)."""
    b = kw.get("block_size", 32)
    nb = x.shape[-1] // b
    rots, infos = [], []
    for j in range(nb):
        xs = x[:, j * b : (j + 1) * b]
        ws = None if weight is None else weight[:, j * b : (j + 1) * b]
        r, info = greedy_rotation(xs, weight=ws, **kw)
        rots.append(r)
        infos.append(info)
    return torch.stack(rots), {"steps": [i["steps"] for i in infos]}
