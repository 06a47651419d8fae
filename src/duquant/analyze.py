"""Per-layer quantization-error analysis (the paper's Figure 1) and activation outlier profiles.

For every decoder block and input position, the normalised MXFP4 error ‖Q(X) − X‖ / ‖X‖ per
32-group (averaged over groups) of the calibration activations as they are, and after each method's
full input transform (smoothing and rotation included), on the full-precision model.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from duquant.calibrate import BlockInputs, capture_block_inputs, collect_input_stats, run_block
from duquant.formats import QuantSpec
from duquant.methods import get_method
from duquant.models.adapters import Adapter
from duquant.pipeline import QuantConfig
from duquant.plan import HeadShape, plan_group

log = logging.getLogger(__name__)


def group_error(x: Tensor, spec: QuantSpec) -> float:
    """Mean over groups of ‖Q(g) − g‖ / ‖g‖ (all-zero groups skipped)."""
    g = x.float().reshape(-1, spec.group_size)
    q = spec.fake_quant(g)
    norms = g.norm(dim=-1)
    keep = norms > 0
    return float(((q - g).norm(dim=-1)[keep] / norms[keep]).mean())


def outlier_ratio(x: Tensor) -> float:
    """Peak |x| over median |x| (the massive-activation signature)."""
    a = x.abs().flatten().float()
    return float(a.max() / a.median().clamp(min=1e-12))


@torch.no_grad()
def analyze(
    model, adapter: Adapter, windows: Tensor, methods: list[str], spec: QuantSpec, seed: int = 0
) -> list[dict]:
    """Rows of (layer, position, method, error, outlier ratio) for every block and input group."""
    inputs: BlockInputs = capture_block_inputs(model, adapter, windows)
    heads = HeadShape.of(model.config)
    quant = QuantConfig(spec, spec)
    rows = []
    for i, block in enumerate(tqdm(adapter.blocks(model), desc="analyze", leave=False)):
        groups = adapter.block_groups(block)
        stats = collect_input_stats(block, groups, inputs, sample_rows=1024, seed=seed + i)
        for j, g in enumerate(groups):
            x = stats[g.name].sample
            rows.append(
                dict(
                    layer=i,
                    position=g.name,
                    method="original",
                    error=group_error(x, spec),
                    outlier_ratio=outlier_ratio(x),
                )
            )
            for name in methods:
                plan = plan_group(
                    block,
                    g,
                    get_method(name),
                    quant,
                    stats[g.name],
                    heads,
                    seed=seed * 1000 + i * 10 + j,
                )
                xt = x if plan.weight_transform is None else plan.weight_transform(x)
                rows.append(
                    dict(
                        layer=i,
                        position=g.name,
                        method=name,
                        error=group_error(xt, spec),
                        outlier_ratio=outlier_ratio(xt),
                    )
                )
        inputs = inputs.next(run_block(block, inputs), i + 1)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """One PNG of error per layer per position, and one outlier profile PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    positions = list(dict.fromkeys(r["position"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for pos in positions:
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in methods:
            pts = [
                (r["layer"], r["error"]) for r in rows if r["position"] == pos and r["method"] == m
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=m)
        ax.set(
            xlabel="layer", ylabel="‖Q(X)−X‖/‖X‖ (MXFP4, per group)", title=f"{title}: {pos} input"
        )
        ax.legend()
        ax.grid(alpha=0.3)
        p = out_dir / f"error_{pos}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    for pos in positions:
        pts = [
            (r["layer"], r["outlier_ratio"])
            for r in rows
            if r["position"] == pos and r["method"] == "original"
        ]
        ax.semilogy(*zip(*pts, strict=True), marker="o", ms=3, label=pos)
    ax.set(xlabel="layer", ylabel="peak |x| / median |x|", title=f"{title}: activation outliers")
    ax.legend()
    ax.grid(alpha=0.3)
    p = out_dir / "outliers.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [*paths, p]
