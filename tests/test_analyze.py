"""`duquant analyze` building blocks: group error against a hand computation, rows and plots."""

from __future__ import annotations

import torch
from test_transforms import outlier_llama

from duquant.analyze import analyze, group_error, outlier_ratio, plot, write_csv
from duquant.formats import QuantSpec
from duquant.models import adapter_for


def test_group_error_matches_hand_computation():
    spec = QuantSpec()
    g = torch.zeros(2, 32)
    g[0, 0] = 7.0  # amax 7: scale 2^(2-2) = 1, 7 saturates to 6 -> error 1/7
    g[1, :] = 1.0  # exact on the grid -> error 0
    assert abs(group_error(g, spec) - (1 / 7 + 0) / 2) < 1e-7
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 100.0])) == 100.0


def test_analyze_rows_and_plots(tmp_path):
    m = outlier_llama()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    rows = analyze(m, adapter_for(m), ids, ["random-hadamard", "duquant++"], QuantSpec())
    assert len(rows) == 2 * 4 * 3
    down = {r["method"]: r["error"] for r in rows if r["position"] == "down" and r["layer"] == 1}
    assert down["duquant++"] < down["original"]  # injected down_proj outliers: rotation must help
    write_csv(rows, tmp_path / "e.csv")
    paths = plot(rows, tmp_path, "tiny")
    assert all(p.stat().st_size > 1000 for p in paths) and (tmp_path / "e.csv").exists()
