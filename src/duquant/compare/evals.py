"""The evaluations `duquant compare` runs: each one's settings, data fingerprint, computation and
table columns in one `Evaluation` entry, so adding an evaluation is adding one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from duquant.data import DataNotFoundError, eval_text, file_sha256, wikitext2_rows
from duquant.eval.perplexity import perplexity

ZS_COLUMNS = ("ARC-E", "ARC-C", "HS", "WG", "LAMB", "PIQA", "OBQA")


@dataclass
class Session:
    """State shared across the jobs of one compare run: its config, the tokenizer and data caches."""

    cfg: Any
    tokenizer: Any = None
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: what changes its number, where its data come from, how to compute it, and
    how a finished record fills its table columns."""

    name: str
    columns: tuple[str, ...]
    settings: Callable[[Any], dict]  # cfg -> the settings that change the number
    fingerprint: Callable[[Any], dict]  # cfg -> {'status': 'ok'|'missing', ...}
    run: Callable[[torch.nn.Module, Session, str, Path], dict]  # model, session, desc, partial
    values: Callable[[dict], dict]  # an ok result -> {column: value, ...extra keys}


# ----------------------------------------------------------------------------- perplexity


def _ppl_values(column: str) -> Callable[[dict], dict]:
    """Table values of a perplexity result."""
    return lambda result: {column: result["ppl"], f"{column} windows": result.get("windows")}


def _wikitext2_settings(cfg) -> dict:
    """WikiText-2: window length and count."""
    return {"name": "wikitext2", "seqlen": cfg.seqlen, "max_windows": cfg.max_windows}


def _wikitext2_fingerprint(cfg) -> dict:
    """Where the WikiText-2 test split comes from now."""
    try:
        _, src = wikitext2_rows("test")
    except DataNotFoundError as exc:
        return {"status": "missing", "reason": str(exc)}
    return {"status": "ok", "source": asdict(src)}


def _wikitext2_run(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """WikiText-2 test perplexity (text tokenized once per compare run)."""
    if "wikitext2" not in s.cache:
        text, src = eval_text("wikitext2")
        s.cache["wikitext2"] = (s.tokenizer(text, return_tensors="pt").input_ids[0], src)
    ids, src = s.cache["wikitext2"]
    res = perplexity(model, ids, s.cfg.seqlen, s.cfg.max_windows, desc=desc, checkpoint=partial)
    res["source"] = asdict(src)
    return res


def _c4_settings(cfg) -> dict:
    """C4: window length, windows drawn and evaluated, sampling seed."""
    return {
        "name": "c4",
        "seqlen": cfg.seqlen,
        "nwindows": cfg.c4_windows,
        "max_windows": cfg.max_windows,
        "seed": 0,
    }


def _c4_fingerprint(cfg) -> dict:
    """Where C4 comes from now (hub, a local shard with its sha256, or missing with the reason)."""
    from duquant.eval.c4 import C4_HUB_FILE, C4_HUB_PATH, c4_documents, c4_mode, local_c4_path

    mode = c4_mode()
    if mode == "missing":
        try:
            c4_documents()
        except DataNotFoundError as exc:
            return {"status": "missing", "reason": str(exc)}
        return {"status": "missing", "reason": "C4 unavailable"}
    if mode == "hub":
        return {"status": "ok", "source": {"origin": f"hub:{C4_HUB_PATH}/{C4_HUB_FILE}"}}
    path = local_c4_path()
    return {"status": "ok", "source": {"origin": str(path), "sha256": file_sha256(Path(path))}}


def _c4_run(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """C4 perplexity by the peers' random-window protocol (windows drawn once per compare run)."""
    from duquant.eval.c4 import c4_windows

    if "c4" not in s.cache:
        s.cache["c4"] = c4_windows(s.tokenizer, s.cfg.seqlen, s.cfg.c4_windows, seed=0)
    windows, info = s.cache["c4"]
    res = perplexity(
        model, windows.reshape(-1), s.cfg.seqlen, s.cfg.max_windows, desc=desc, checkpoint=partial
    )
    res["source"] = asdict(info.source)
    res["c4"] = {k: v for k, v in asdict(info).items() if k != "source"}
    return res


# ----------------------------------------------------------------------------- zero-shot


def zeroshot_config(cfg):
    """The zero-shot config of a compare run."""
    from duquant.eval.zeroshot import PAPER_TASKS, ZeroShotConfig

    return ZeroShotConfig(
        tasks=tuple(cfg.tasks or PAPER_TASKS),
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        source=cfg.zeroshot_source,
    )


def _zeroshot_settings(cfg) -> dict:
    """Zero-shot: tasks, example limit, batch size, data source."""
    return {"name": "zeroshot", **asdict(zeroshot_config(cfg))}


def _zeroshot_fingerprint(cfg) -> dict:
    """Every task's data source."""
    from duquant.eval.zeroshot import plan_tasks

    try:
        plans = plan_tasks(zeroshot_config(cfg))
    except DataNotFoundError as exc:
        return {"status": "missing", "reason": str(exc)}
    return {"status": "ok", "tasks": {p.name: asdict(p) for p in plans}}


def _zeroshot_run(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """Zero-shot accuracies through lm-eval on the in-memory model (no per-example checkpoint)."""
    from duquant.eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, s.tokenizer, zeroshot_config(s.cfg))


def _zeroshot_values(result: dict) -> dict:
    """Accuracies in %, the average, examples per task, LAMBADA perplexity and task notes."""
    from duquant.eval.zeroshot import TASKS

    values: dict[str, Any] = {"notes": []}
    for name, t in result["tasks"].items():
        col = TASKS[name].column
        ok = t.get("status") == "ok" and t.get("score") is not None
        values[col] = 100 * t["score"] if ok else t.get("status", "missing")
        if t.get("note"):
            values["notes"].append(f"{col}: {t['note']}")
        if ok:
            values.setdefault("examples", {})[col] = f"{t.get('n_examples')}/{t.get('n_available')}"
        if ok and t.get("perplexity") is not None:
            values["LAMB PPL"] = t["perplexity"]
    avg = result["average"]
    values["Avg"] = 100 * avg["value"] if avg["over"] else "missing"
    values["Avg over"] = [TASKS[t].column for t in avg["over"]]
    return values


EVALUATIONS: dict[str, Evaluation] = {
    e.name: e
    for e in (
        Evaluation(
            "wikitext2",
            ("W2 PPL",),
            _wikitext2_settings,
            _wikitext2_fingerprint,
            _wikitext2_run,
            _ppl_values("W2 PPL"),
        ),
        Evaluation(
            "c4", ("C4 PPL",), _c4_settings, _c4_fingerprint, _c4_run, _ppl_values("C4 PPL")
        ),
        Evaluation(
            "zeroshot",
            (*ZS_COLUMNS, "Avg"),
            _zeroshot_settings,
            _zeroshot_fingerprint,
            _zeroshot_run,
            _zeroshot_values,
        ),
    )
}
EVALS = tuple(EVALUATIONS)
COLUMNS = ("method", *(c for e in EVALUATIONS.values() for c in e.columns))
