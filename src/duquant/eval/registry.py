"""The evaluations of `duquant run` and `duquant compare`, one `Evaluation` entry each: what changes
its number, where its data come from, how its data are loaded and checked, how it is computed and
which table columns it fills. Adding an evaluation is adding one entry to `EVALUATIONS`.

Entries: `wikitext2` and `c4` (perplexity), `lambada` (lm-eval's lambada_openai alone: accuracy and
its perplexity), `zeroshot` (the paper's seven tasks through lm-eval), and, for any name that is the
path of a UTF-8 text file, the perplexity of that text (`evaluation_for`).

Perplexity entries tokenize their data once per `Session` (`prepare`, or the first `run`/`token_ids`)
and keep it in `session.cache[name]`; a result is `perplexity()`'s dict plus `source` (and C4's
sampling record `c4`), the fields `provenance` returns.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from duquant.data import DataNotFoundError, TextSource, eval_text, file_sha256, wikitext2_rows
from duquant.eval.perplexity import perplexity

ZS_COLUMNS = ("ARC-E", "ARC-C", "HS", "WG", "LAMB", "PIQA", "OBQA")
LAMBADA_TASK = "lambada_openai"


@dataclass
class Session:
    """State shared by the evaluations of one run or compare: its settings (seqlen, max_windows,
    c4_windows, limit, tasks, batch_size, zeroshot_source), the tokenizer and the data caches."""

    settings: Any
    tokenizer: Any = None
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: what changes its number, where its data come from, how to compute it, how a
    finished result fills its table columns, and how its data are loaded and checked up front."""

    name: str
    columns: tuple[str, ...]
    settings: Callable[[Any], dict]  # settings -> what changes the number (compare's cache key)
    fingerprint: Callable[[Any], dict]  # settings -> {'status': 'ok'|'missing', ...}
    run: Callable[[nn.Module, Session, str, Path | None], dict]  # model, session, desc, partial
    values: Callable[[dict], dict]  # an ok result -> {column: value, ...extra keys}
    prepare: Callable[[Session, int], None]  # session, vocab rows: load and check, or ValueError
    token_ids: Callable[[Session], Tensor | None]  # the flat ids perplexity() windows, or None


# ----------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class _Tokens:
    """A perplexity evaluation's data: the flat token ids and the fields its result records."""

    ids: Tensor
    extra: dict  # source (and c4's sampling record)


def _tokens(name: str, load: Callable[[Session], _Tokens]) -> Callable[[Session], _Tokens]:
    """`load`, run once per session (its result kept in `session.cache[name]`)."""

    def tokens(s: Session) -> _Tokens:
        if name not in s.cache:
            s.cache[name] = load(s)
        return s.cache[name]

    return tokens


def _text_tokens(name: str) -> Callable[[Session], _Tokens]:
    """Loader of an evaluation text ('wikitext2' or a file): tokenized whole, at once."""

    def load(s: Session) -> _Tokens:
        text, src = eval_text(name)
        return _Tokens(s.tokenizer(text, return_tensors="pt").input_ids[0], {"source": asdict(src)})

    return load


def _c4_tokens(s: Session) -> _Tokens:
    """C4's windows by the peers' random-window protocol (seed 0), concatenated."""
    from duquant.eval.c4 import c4_windows

    try:
        windows, info = c4_windows(s.tokenizer, s.settings.seqlen, s.settings.c4_windows, seed=0)
    except ValueError as exc:  # no document longer than seqlen
        raise ValueError(f"--eval c4: {exc}; give a smaller --seqlen") from exc
    extra = {
        "source": asdict(info.source),
        "c4": {k: v for k, v in asdict(info).items() if k != "source"},
    }
    return _Tokens(windows.reshape(-1), extra)


def _ppl_run(tokens: Callable[[Session], _Tokens]):
    """`run` of a perplexity evaluation: perplexity() over its ids, plus its provenance."""

    def run(model: nn.Module, s: Session, desc: str, partial: Path | None) -> dict:
        t = tokens(s)
        res = perplexity(
            model, t.ids, s.settings.seqlen, s.settings.max_windows, desc=desc, checkpoint=partial
        )
        res.update(t.extra)
        return res

    return run


def _ppl_prepare(name: str, tokens: Callable[[Session], _Tokens]):
    """`prepare` of a perplexity evaluation: tokenize, refuse unless one window fits and every id
    is a row of the model's embedding."""

    def prepare(s: Session, vocab_rows: int) -> None:
        ids = tokens(s).ids
        seqlen = s.settings.seqlen
        if ids.numel() < seqlen:
            raise ValueError(
                f"--eval {name}: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                "give a longer text or a smaller --seqlen"
            )
        if ids.numel() and int(ids.max()) >= vocab_rows:
            raise ValueError(
                f"--eval {name}: the tokenizer emits id {int(ids.max())} but the model's embedding "
                f"has {vocab_rows} rows; use the tokenizer that belongs to this model"
            )

    return prepare


def _ppl_values(column: str) -> Callable[[dict], dict]:
    """Table values of a perplexity result."""
    return lambda result: {column: result["ppl"], f"{column} windows": result.get("windows")}


def _ppl_evaluation(
    name: str,
    column: str,
    settings: Callable[[Any], dict],
    fingerprint: Callable[[Any], dict],
    load: Callable[[Session], _Tokens],
) -> Evaluation:
    """A perplexity evaluation over the ids `load` gives."""
    tokens = _tokens(name, load)
    return Evaluation(
        name,
        (column,),
        settings,
        fingerprint,
        _ppl_run(tokens),
        _ppl_values(column),
        _ppl_prepare(name, tokens),
        lambda s: tokens(s).ids,
    )


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


def _text_settings(name: str) -> Callable[[Any], dict]:
    """A text file: its path, window length and count."""
    return lambda cfg: {
        "name": "text",
        "path": name,
        "seqlen": cfg.seqlen,
        "max_windows": cfg.max_windows,
    }


def _text_fingerprint(name: str) -> Callable[[Any], dict]:
    """A text file's path and sha256, or missing when it is not a file."""

    def fingerprint(cfg) -> dict:
        path = Path(name)
        if not path.is_file():
            return {"status": "missing", "reason": f"{name} is not a file"}
        return {
            "status": "ok",
            "source": asdict(TextSource("file", "all", name, file_sha256(path))),
        }

    return fingerprint


@functools.cache
def _text_evaluation(name: str) -> Evaluation:
    """The perplexity of the UTF-8 text file `name`."""
    return _ppl_evaluation(
        name,
        f"{Path(name).name} PPL",
        _text_settings(name),
        _text_fingerprint(name),
        _text_tokens(name),
    )


# ----------------------------------------------------------------------------- lm-eval tasks


def zeroshot_config(cfg, tasks: tuple[str, ...] | None = None):
    """The zero-shot config of `cfg` (its tasks, or all seven), or of `tasks` when given."""
    from duquant.eval.zeroshot import PAPER_TASKS, ZeroShotConfig

    return ZeroShotConfig(
        tasks=tuple(tasks or cfg.tasks or PAPER_TASKS),
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        source=cfg.zeroshot_source,
    )


def _lm_eval_prepare(name: str, tasks: tuple[str, ...] | None):
    """`prepare` of an lm-eval evaluation: its config is valid, lm-eval is installed, and (for a
    single task) its data are there."""

    def prepare(s: Session, vocab_rows: int) -> None:
        from duquant.eval.zeroshot import plan_tasks

        try:
            zs = zeroshot_config(s.settings, tasks)
        except ValueError as exc:
            raise ValueError(f"--eval {name}: {exc}") from exc
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(
                f"--eval {name}: lm-eval is not installed; pip install 'duquant[eval]' "
                "(lm-eval>=0.4.5 and datasets)"
            )
        if tasks is not None:
            missing = [p for p in plan_tasks(zs) if p.mode == "missing"]
            if missing:
                raise ValueError(
                    f"--eval {name}: data missing ({missing[0].reason}); put them under "
                    "DUQUANT_DATA_DIR (shared/data/MANIFEST.md) or allow the hub"
                )

    return prepare


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


def _zeroshot_run(model: nn.Module, s: Session, desc: str, partial: Path | None) -> dict:
    """Zero-shot accuracies through lm-eval on the in-memory model (no per-example checkpoint)."""
    from duquant.eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, s.tokenizer, zeroshot_config(s.settings))


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


def _lambada_settings(cfg) -> dict:
    """LAMBADA: example limit, batch size, data source."""
    return {"name": "lambada", **asdict(zeroshot_config(cfg, (LAMBADA_TASK,)))}


def _lambada_fingerprint(cfg) -> dict:
    """LAMBADA's data source, or missing with the file it needs."""
    from duquant.eval.zeroshot import plan_tasks

    try:
        (plan,) = plan_tasks(zeroshot_config(cfg, (LAMBADA_TASK,)))
    except DataNotFoundError as exc:
        return {"status": "missing", "reason": str(exc)}
    if plan.mode == "missing":
        return {"status": "missing", "reason": plan.reason}
    return {"status": "ok", "tasks": {plan.name: asdict(plan)}}


def _lambada_run(model: nn.Module, s: Session, desc: str, partial: Path | None) -> dict:
    """LAMBADA accuracy and perplexity through lm-eval on the in-memory model."""
    from duquant.eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, s.tokenizer, zeroshot_config(s.settings, (LAMBADA_TASK,)))


def _lambada_values(result: dict) -> dict:
    """LAMBADA accuracy in %, its perplexity and examples evaluated/available."""
    t = result["tasks"][LAMBADA_TASK]
    if t.get("status") != "ok" or t.get("score") is None:
        status = t.get("status", "missing")
        return {"LAMB": status, "LAMB PPL": status}
    return {
        "LAMB": 100 * t["score"],
        "LAMB PPL": t.get("perplexity"),
        "examples": {"LAMB": f"{t.get('n_examples')}/{t.get('n_available')}"},
    }


# ----------------------------------------------------------------------------- the registry


def _no_ids(s: Session) -> None:
    """token_ids of an evaluation that is not a perplexity."""
    return None


EVALUATIONS: dict[str, Evaluation] = {
    e.name: e
    for e in (
        _ppl_evaluation(
            "wikitext2",
            "W2 PPL",
            _wikitext2_settings,
            _wikitext2_fingerprint,
            _text_tokens("wikitext2"),
        ),
        _ppl_evaluation("c4", "C4 PPL", _c4_settings, _c4_fingerprint, _c4_tokens),
        Evaluation(
            "lambada",
            ("LAMB", "LAMB PPL"),
            _lambada_settings,
            _lambada_fingerprint,
            _lambada_run,
            _lambada_values,
            _lm_eval_prepare("lambada", (LAMBADA_TASK,)),
            _no_ids,
        ),
        Evaluation(
            "zeroshot",
            (*ZS_COLUMNS, "Avg"),
            _zeroshot_settings,
            _zeroshot_fingerprint,
            _zeroshot_run,
            _zeroshot_values,
            _lm_eval_prepare("zeroshot", None),
            _no_ids,
        ),
    )
}
EVALS = tuple(EVALUATIONS)
# the paper's Table 1: compare's table always shows these evaluations' columns
PAPER_EVALS = ("wikitext2", "c4", "zeroshot")


def evaluation_for(name: str) -> Evaluation:
    """The registry entry `name`, or the perplexity of the text file at path `name`."""
    if name in EVALUATIONS:
        return EVALUATIONS[name]
    if Path(name).is_file():
        return _text_evaluation(name)
    raise ValueError(
        f"evaluation {name!r}: neither one of {', '.join(EVALS)} nor an existing text file; "
        "give one of those or the path of a UTF-8 text file"
    )


def is_perplexity(ev: Evaluation) -> bool:
    """Whether `ev` is a perplexity over token windows (it has `token_ids`: the streamed path can
    compute it)."""
    return ev.token_ids is not _no_ids


def metrics_key(name: str) -> str:
    """Where a result goes in a run's metrics: the registry name, or a text file's name."""
    return name if name in EVALUATIONS else Path(name).name


def provenance(session: Session, name: str) -> dict:
    """The fields a perplexity result of `name` records besides perplexity()'s own (`source`, and
    C4's sampling record), for a result computed elsewhere on `token_ids` (the streamed path)."""
    if evaluation_for(name).token_ids(session) is None:  # loads the data once per session
        return {}
    return dict(session.cache[name].extra)


def table_columns(names: Iterable[str] = ()) -> tuple[str, ...]:
    """A table's columns: 'method', the paper's Table-1 columns, then those of any other evaluation
    in `names` (in their order, each column once)."""
    evals = [EVALUATIONS[n] for n in PAPER_EVALS] + [evaluation_for(n) for n in names]
    return ("method", *dict.fromkeys(c for e in evals for c in e.columns))


COLUMNS = table_columns()
