"""Shared fixtures: the real default model (session-scoped, skipped when absent) and a tiny random Llama."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# without a GPU the Triton kernel tests run in Triton's CPU interpreter, which must be switched on
# before triton is first imported (a GPU machine keeps the real compiler)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def shared_data_dir() -> Path | None:
    """The folder of the zero-shot files (not shipped in the package): $DUQUANT_DATA_DIR, else ../shared/data."""
    env = os.environ.get("DUQUANT_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "arc" / "ARC-Easy-Test.jsonl").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the offline zero-shot data folder; skips the test when it cannot be found."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("offline zero-shot files not found (set DUQUANT_DATA_DIR)")
    return path


@pytest.fixture
def offline_data(monkeypatch) -> None:
    """No hub and no data directory: WikiText-2 test/validation come from the copy inside the package,
    as on a fresh machine with nothing beside the checkout."""
    import duquant.data

    monkeypatch.delenv("DUQUANT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)


@pytest.fixture
def offline_zeroshot(monkeypatch, shared_data) -> Path:
    """No hub, and $DUQUANT_DATA_DIR at the zero-shot files (skips when they are absent)."""
    import duquant.data

    monkeypatch.setenv("DUQUANT_DATA_DIR", str(shared_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)
    return shared_data


def forbid_model_loading(monkeypatch, why: str = "a model was loaded despite bad input") -> None:
    """Make every model load fail the test (refusals must come before it): the orchestration
    layer's loader, the plain loader it calls, and the models package's."""
    import duquant.api
    import duquant.models

    def boom(*a, **k):
        raise AssertionError(why)

    monkeypatch.setattr(duquant.api, "load_model", boom)
    monkeypatch.setattr(duquant.api, "load_plain_model", boom)
    monkeypatch.setattr(duquant.models, "load_model", boom)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct GGUF) loaded once per session via `load_model()`.

    Skips when the model cannot be found. Tests must not modify it in place: deep-copy `.model` first.
    """
    from duquant.models import default_model, load_model

    # under CI (CI=true) the set-up has fetched the model: a missing one fails instead of skipping,
    # so the real-model CI tests can never pass by not running
    absent = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        source = default_model()
    except FileNotFoundError as exc:
        absent(f"default model not found: {exc}")
    if source.endswith(".gguf") and not Path(source).is_file():
        absent(f"default model {source} does not exist")
    return load_model()


# the tiny decoder geometry every architecture test shares
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(TINY_CONFIG, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.float().eval()


@pytest.fixture
def tiny_llama():
    """A fresh seeded tiny random Llama per test (tests may modify it in place)."""
    return make_tiny_llama()


# tiny configs of every supported family, built from transformers' own config classes: hidden 128,
# 4 heads of 32 (2 KV heads), intermediate 128, 2 blocks; each with what makes its family different
FAMILIES = (
    "llama3",
    "mistral",
    "qwen2.5",
    "qwen3",
    "gemma3",
    "phi3",
    "qwen3_moe",
    "mixtral",
    "olmoe",
)


def make_tiny_family(family: str, seed: int = 0):
    """A tiny random model of `family` with random norm weights and residual outliers (eval, float32)."""
    import transformers as tf

    base = dict(TINY_CONFIG, hidden_size=128, head_dim=32, tie_word_embeddings=False)
    cls, cfg = {
        "llama3": (
            tf.LlamaForCausalLM,
            tf.LlamaConfig(
                **dict(base, tie_word_embeddings=True),
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**base, sliding_window=16)),
        "qwen2.5": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**base)),  # q/k/v biases
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**base)),  # q/k norms
        "gemma3": (
            tf.Gemma3ForCausalLM,
            tf.Gemma3TextConfig(
                **dict(base, tie_word_embeddings=True),
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=32,
            ),
        ),
        "phi3": (
            tf.Phi3ForCausalLM,
            tf.Phi3Config(**base, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ),
        "qwen3_moe": (
            tf.Qwen3MoeForCausalLM,
            tf.Qwen3MoeConfig(
                **base,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=64,
                mlp_only_layers=[1],  # block 1 dense, block 0 sparse
            ),
        ),
        "mixtral": (
            tf.MixtralForCausalLM,
            tf.MixtralConfig(**dict(base, intermediate_size=64), num_local_experts=4),
        ),
        "olmoe": (
            tf.OlmoeForCausalLM,
            tf.OlmoeConfig(
                **dict(base, intermediate_size=64), num_experts=4, num_experts_per_tok=2
            ),
        ),
    }[family]
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm weights so folds into norms are visible
                p.copy_(
                    torch.rand(p.shape, generator=gen) * 1.5 - (0.5 if family == "gemma3" else -0.5)
                )
            elif p.ndim >= 2 and "mlp.gate.weight" not in name:
                p.normal_(0, 0.05, generator=gen)
            else:
                p.normal_(0, 0.02, generator=gen)  # biases, router
        emb = model.get_input_embeddings().weight
        emb[:, [3, 77]] *= 30.0  # residual-stream outliers
    return model


def transformed_fp_logits(base, method: str, ids, max_steps: int):
    """(reference logits, logits of a copy with `method`'s transforms applied and nothing quantized,
    that copy): the full-precision invariance check every architecture test makes."""
    from duquant.methods import get_method
    from duquant.models import adapter_for
    from duquant.pipeline import QuantConfig, quantize_model

    with torch.no_grad():
        ref = base(ids).logits
    m = copy.deepcopy(base)
    quantize_model(
        m, adapter_for(m), get_method(method, max_steps=max_steps), QuantConfig(None, None), ids
    )
    with torch.no_grad():
        out = m(ids).logits
    return ref, out, m


# ------------------------------------------------------------------ ranks on loopback (gloo)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test: on a shared 2-core machine, OpenMP threads that
    wait on each other while other processes hold the cores made forwards ~8x slower than one thread;
    and a one-process reference compared bit for bit with gloo ranks (one thread each): a matmul's
    summation order can depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gloo_rank(rank: int, fn, world: int, port: int, args: tuple) -> None:
    """One forked rank: join the gloo group on 127.0.0.1, run `fn(rank, *args)`, leave."""
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, *args)
    finally:
        tdist.destroy_process_group()


def run_gloo_ranks(
    fn, world: int, args: tuple = (), timeout_s: float = 120.0, why: str = ""
) -> None:
    """Run `fn(rank, *args)` in `world` forked processes joined in one gloo group on 127.0.0.1; wait
    at most `timeout_s` (then TimeoutError, `why` or the default reason) and stop them whatever
    happens."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _gloo_rank,
        args=(fn, world, free_port(), args),
        nprocs=world,
        join=False,
        start_method="fork",  # the parent has imported everything: seconds, not tens
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(why or f"{world} ranks did not finish within {timeout_s:g} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
