"""Compare's report: the paper's Table-1 layout as table.json, table.md and table.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from duquant._version import __version__
from duquant.compare.jobs import CompareConfig, jobs_of
from duquant.eval.registry import COLUMNS, ZS_COLUMNS, evaluation_for, table_columns
from duquant.formats import DEFAULT_SCALE_RULE


def row_values(cells: list, columns: tuple[str, ...] = COLUMNS) -> dict:
    """The table row of one job from its cells: column -> number, 'missing', 'nonfinite' or None."""
    row: dict[str, Any] = {c: None for c in columns[1:]}
    notes: list[str] = []
    for cell in cells:
        rec = cell.record or {}
        ev = evaluation_for(cell.name)
        if rec.get("status") != "ok":
            for col in ev.columns:
                row[col] = rec.get("status")
            continue
        values = ev.values(rec["result"])
        notes.extend(values.pop("notes", []))
        if "examples" in values and "examples" in row:  # two evaluations' examples per task
            values["examples"] = {**row["examples"], **values["examples"]}
        row.update(values)
    row["notes"] = notes
    return row


def build_table(cfg: CompareConfig, cells: list, model_source: str) -> dict:
    """table.json content: config, columns, one row per job, and every result record."""
    from duquant.compare.cache import progress

    columns = table_columns(cfg.evals)
    rows = []
    for job in jobs_of(cfg):
        mine = [c for c in cells if c.job == job]
        rows.append(
            {
                "label": job.label,
                "method": job.method,
                "weights": job.weights,
                "values": row_values(mine, columns),
                "results": {c.name: c.record for c in mine},
                "pending": {c.name: progress(c.path) for c in mine if c.record is None},
            }
        )
    return {
        "model": model_source,
        "config": cfg.to_dict(),
        "columns": list(columns),
        "rows": rows,
        "duquant_version": __version__,
    }


def _fmt(value: Any, ppl: bool) -> str:
    """A table cell: numbers to 2 (PPL) or 1 (accuracy, %) decimals, '–' when not evaluated."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.2f}" if ppl else f"{value:.1f}"


def table_markdown(table: dict) -> str:
    """The paper's Table-1 layout as Markdown, with the settings and footnotes."""
    cfg = table["config"]
    columns = table["columns"]
    default = DEFAULT_SCALE_RULE.get(cfg["format"], "default")
    lines = [
        f"# duquant compare: {table['model']}",
        "",
        f"Format {cfg['format']} W4A4, weight/act scale rules "
        f"{cfg['w_scale_rule'] or default}/{cfg['a_scale_rule'] or default}, rounding {cfg['rounding']}; "
        f"PPL seqlen {cfg['seqlen']}, max windows {cfg['max_windows'] or 'all'}; zero-shot limit "
        f"{cfg['limit'] or 'none'} per task (accuracies in %); seed {cfg['seed']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    notes: list[str] = []
    for row in table["rows"]:
        v = row["values"]
        cells = [row["label"]] + [_fmt(v[c], c.endswith("PPL")) for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
        notes.extend(n for n in v.get("notes", []) if n not in notes)
        over = v.get("Avg over")
        if over is not None and len(over) < len(ZS_COLUMNS):
            notes.append(f"{row['label']}: Avg over {', '.join(over) or 'no task'} only")
    for row in table["rows"]:
        for name, rec in row["results"].items():
            if rec and rec.get("status") == "missing":
                note = f"{name} missing: {rec.get('reason')}"
                if note not in notes:
                    notes.append(note)
            elif rec and rec.get("status") == "ok" and "tasks" in rec["result"]:  # lm-eval's
                for t, r in rec["result"]["tasks"].items():
                    if r.get("status") == "missing":
                        note = f"{t} missing: {r.get('reason')}"
                        if note not in notes:
                            notes.append(note)
    pending = [
        f"{row['label']} {name} ({state})"
        for row in table["rows"]
        for name, state in row.get("pending", {}).items()
    ]
    if pending:
        notes.append("not computed yet (`–`): " + ", ".join(pending))
    notes.extend(_detail_notes(table["rows"], columns))
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _detail_notes(rows: list[dict], columns: list[str]) -> list[str]:
    """Footnotes with windows, examples per task and LAMBADA perplexity (unless it is a column)."""
    notes = []
    for col in (c for c in columns if c.endswith("PPL")):
        wins = {r["label"]: r["values"].get(f"{col} windows") for r in rows}
        if any(w is not None for w in wins.values()):
            notes.append(
                f"{col} windows: " + ", ".join(f"{k} {w}" for k, w in wins.items() if w is not None)
            )
    examples = next((r["values"]["examples"] for r in rows if r["values"].get("examples")), None)
    if examples:
        notes.append(
            "zero-shot examples evaluated/available: "
            + ", ".join(f"{k} {v}" for k, v in examples.items())
        )
    lamb = {r["label"]: r["values"].get("LAMB PPL") for r in rows}
    if "LAMB PPL" not in columns and any(v is not None for v in lamb.values()):
        notes.append(
            "LAMBADA perplexity: "
            + ", ".join(f"{k} {_fmt(v, True)}" for k, v in lamb.items() if v is not None)
        )
    return notes


def plot_table(table: dict, path: Path) -> Path | None:
    """A PNG bar chart: perplexities and zero-shot accuracies per method (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    panels = []
    cols = [c for c in table["columns"][1:] if any(_num(r["values"][c]) for r in rows)]
    ppl_cols = [c for c in cols if c.endswith("PPL")]
    acc_cols = [c for c in cols if not c.endswith("PPL")]
    if ppl_cols:
        panels.append(("perplexity (lower is better)", ppl_cols))
    if acc_cols:
        panels.append(("zero-shot accuracy % (higher is better)", acc_cols))
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 + 1.2 * sum(len(c) for _, c in panels), 4), squeeze=False
    )
    width = 0.8 / max(len(rows), 1)
    colors = plt.get_cmap("tab20").colors  # distinct for up to 20 rows (tab10 repeats after 10)
    for ax, (title, cols) in zip(axes[0], panels, strict=True):
        for k, row in enumerate(rows):
            ys = [row["values"][c] if _num(row["values"][c]) else 0.0 for c in cols]
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(cols))]
            bars = ax.bar(xs, ys, width, label=row["label"], color=colors[k % len(colors)])
            if len(rows) <= 6:  # more labels than that overlap into noise
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_title(title)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
    fig.suptitle(Path(str(table["model"])).name, fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(v: Any) -> bool:
    """Whether a table value is a finite number."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_outputs(table: dict, out: Path) -> None:
    """table.md, table.json and table.png in `out`."""
    from duquant.jsonio import write_json

    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_markdown(table))
    write_json(table, out / "table.json")
    plot_table(table, out / "table.png")
