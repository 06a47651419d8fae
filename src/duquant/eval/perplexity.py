"""Perplexity by the standard protocol: text tokenized once, non-overlapping windows, mean NLL, exp."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from duquant import distributed as dist
from duquant.jsonio import read_json_object, write_json

log = logging.getLogger(__name__)

# A resumed model must reproduce the last checkpointed window's NLL this closely (relative). Float
# reassociation across thread counts moves a window's NLL by ~1e-6 and passes; another model (other
# weights, method or seed) is off by far more and the checkpoint is discarded.
RESUME_RTOL = 1e-4


class NonFiniteLossError(RuntimeError):
    """The model produced NaN/Inf logits: the quantized model is broken, not merely inaccurate."""


def tokens_fingerprint(ids: torch.Tensor, seqlen: int) -> str:
    """sha256 of the tokens all full windows cover (ties a checkpoint to its text, whatever max_windows)."""
    used = ids[: (ids.numel() // seqlen) * seqlen].to("cpu", torch.int64).contiguous().numpy()
    return hashlib.sha256(used.tobytes()).hexdigest()


def _window_nll(model: nn.Module, window: torch.Tensor, index: int) -> float:
    """Summed next-token NLL of one window; raises on a non-finite loss."""
    logits = model(window, use_cache=False).logits[0, :-1].float()
    loss = F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"window {index} gave a non-finite loss ({loss})")
    return loss


# a checkpoint holds one float per window: far below this even for a whole corpus
MAX_CHECKPOINT_BYTES = 64 << 20
# a window's summed NLL per predicted token above this would overflow exp(): no real window's
MAX_TOKEN_NLL = 700.0
CHECKPOINT_KEYS = ("fingerprint", "seqlen", "total_windows", "window_nll", "seconds")


def _finite(value, low: float = 0.0, high: float = math.inf) -> bool:
    """Whether `value` is a real number (not a bool), finite and within [low, high]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value) if abs(value) < 1e300 else math.inf)
        and low <= value <= high
    )


def checkpoint_problem(ck) -> str | None:
    """What is wrong with the checkpoint `ck` (None: nothing), naming the key."""
    if not isinstance(ck, dict):
        return "not a JSON object"
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        return f"key {missing[0]!r} is missing"
    if not isinstance(ck["fingerprint"], str) or len(ck["fingerprint"]) != 64:
        return "key 'fingerprint' is not a sha256"
    seqlen, total, nll = ck["seqlen"], ck["total_windows"], ck["window_nll"]
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        return "key 'seqlen' is not a window length >= 2"
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        return "key 'total_windows' is not a count >= 1"
    if not isinstance(nll, list) or len(nll) > total:
        return "key 'window_nll' is not a list of at most 'total_windows' numbers"
    bound = MAX_TOKEN_NLL * (seqlen - 1)
    if not all(_finite(x, 0.0, bound) for x in nll):
        return f"key 'window_nll' holds a value that is not a finite number in [0, {bound:g}]"
    if not _finite(ck["seconds"]):
        return "key 'seconds' is not a finite number >= 0"
    return None


def read_checkpoint(path: Path) -> dict | None:
    """The validated per-window checkpoint at `path`, or None (with one warning) when it is
    unreadable, not UTF-8 JSON or not of the expected shape; None without a word when absent."""
    if not path.is_file():
        return None
    try:
        ck = read_json_object(path, MAX_CHECKPOINT_BYTES, constants=True)
        problem = checkpoint_problem(ck)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; the rest guard the checks themselves
    except (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
    if problem is not None:
        log.warning(
            "ignoring perplexity checkpoint %s (%s): starting that cell over", path, problem
        )
        return None
    return ck


def _load_checkpoint(
    path: Path, fingerprint: str, seqlen: int, total_windows: int
) -> tuple[list[float], float]:
    """Per-window NLLs and seconds spent of an earlier pass over the same tokens (the same text,
    window length and window count), or ([], 0)."""
    ck = read_checkpoint(path)
    if ck is None:
        return [], 0.0
    if (ck["fingerprint"], ck["seqlen"], ck["total_windows"]) != (
        fingerprint,
        seqlen,
        total_windows,
    ):
        log.warning("ignoring perplexity checkpoint %s: it is for other tokens", path)
        return [], 0.0
    return [float(x) for x in ck["window_nll"]], float(ck["seconds"])


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    desc: str = "ppl",
    checkpoint: str | Path | None = None,
) -> dict:
    """PPL of `model` on the 1-D token tensor `input_ids` over ⌊N/seqlen⌋ windows (at most `max_windows`).

    With `checkpoint`, every finished window's NLL is saved there, and a later call with the same
    tokens resumes after the last saved window once the model reproduces that window's NLL (a longer
    checkpoint also serves a smaller `max_windows`). `seconds` counts this call only; windows taken
    from the checkpoint are `resumed_windows`, their time `resumed_seconds`.
    """
    ids = input_ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = next(model.parameters()).device
    start = time.perf_counter()

    def window(i: int) -> torch.Tensor:
        return ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)

    if dist.active():
        return _sharded(model, window, n_windows, seqlen, ids.numel() // seqlen, desc, start)
    done: list[float] = []
    spent = 0.0
    ck_path = Path(checkpoint) if checkpoint is not None else None
    # what a checkpoint must have been made from: these tokens, this window length and count
    tokens = (tokens_fingerprint(ids, seqlen) if ck_path else "", seqlen, ids.numel() // seqlen)
    if ck_path is not None:
        done, spent = _resume(model, window, ck_path, tokens, n_windows, desc)
    resumed = len(done)
    for i in tqdm(
        range(resumed, n_windows), desc=desc, leave=False, initial=resumed, total=n_windows,
        disable=not dist.is_main(),
    ):  # fmt: skip
        done.append(_window_nll(model, window(i), i))
        if ck_path is not None:
            seconds = spent + time.perf_counter() - start
            ck_path = _save_progress(ck_path, tokens, done, seconds)
    return _result(done, n_windows, seqlen, ids.numel() // seqlen, resumed, spent, start)


def _sharded(
    model: nn.Module,
    window: Callable[[int], torch.Tensor],
    n_windows: int,
    seqlen: int,
    total_windows: int,
    desc: str,
    start: float,
) -> dict:
    """`perplexity` under torch.distributed: each rank its contiguous share of the windows, the
    per-window NLLs gathered in window order (the same list, hence the same sum, as one process;
    no checkpoint: a rank's partial list would not resume another world size's)."""
    mine = dist.shard(n_windows)
    done = [
        _window_nll(model, window(i), i)
        for i in tqdm(mine, desc=desc, leave=False, disable=not dist.is_main())
    ]
    return _result(dist.gather_list(done), n_windows, seqlen, total_windows, 0, 0.0, start)


def _resume(
    model: nn.Module,
    window: Callable[[int], torch.Tensor],
    ck_path: Path,
    tokens: tuple[str, int, int],
    n_windows: int,
    desc: str,
) -> tuple[list[float], float]:
    """The checkpoint's NLLs of the first `n_windows` windows and their share of its seconds, kept
    only when the model reproduces the last of them (another model starts over: ([], 0))."""
    saved, spent = _load_checkpoint(ck_path, *tokens)
    done = saved[:n_windows]
    spent *= len(done) / max(len(saved), 1)
    if not done:
        return done, spent
    last = len(done) - 1
    again = _window_nll(model, window(last), last)
    if math.isclose(again, done[last], rel_tol=RESUME_RTOL):
        log.info("%s: resuming after %d of %d windows (%s)", desc, len(done), n_windows, ck_path)
        return done, spent
    log.warning(
        "%s: checkpoint %s disagrees with this model on window %d (%.6g vs %.6g): starting over",
        desc,
        ck_path,
        last,
        again,
        done[last],
    )
    return [], 0.0


def _save_progress(
    ck_path: Path, tokens: tuple[str, int, int], done: list[float], seconds: float
) -> Path | None:
    """Write the finished windows' NLLs to the checkpoint; None (stop saving) when that fails."""
    fingerprint, seqlen, total_windows = tokens
    try:
        payload = {
            "fingerprint": fingerprint,
            "seqlen": seqlen,
            "total_windows": total_windows,
            "window_nll": done,
            "seconds": seconds,
        }
        write_json(payload, ck_path)
    except OSError as exc:  # a full disk costs the checkpoint, not the evaluation
        log.warning("could not save progress to %s (%s): going on without", ck_path, exc)
        return None
    return ck_path


def _result(
    done: list[float],
    n_windows: int,
    seqlen: int,
    total_windows: int,
    resumed: int,
    spent: float,
    start: float,
) -> dict:
    """The perplexity record from the windows' summed NLLs (mean NLL per predicted token, exp)."""
    count = n_windows * (seqlen - 1)
    nll = math.fsum(done) / count
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": n_windows,
        "seqlen": seqlen,
        "tokens": count,
        "total_windows": total_windows,
        "resumed_windows": resumed,
        "resumed_seconds": spent,
        "seconds": time.perf_counter() - start,
    }
