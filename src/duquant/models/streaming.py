"""Models larger than memory: quantize block by block with only the current block's weights loaded.

The model is built with every parameter on the meta device (no memory); buffers such as RoPE
frequencies are real. Weights come from the safetensors shards lazily: the embedding while the
calibration inputs are captured, then one decoder block at a time. A quantized block is written to
the work folder (`block_00012.pt`) and dropped before the next one is loaded; evaluation streams the
quantized blocks back the same way. The calibration activations (the inputs and outputs of the
current block for every window) are the only other thing held: `activation_bytes` states it.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from duquant.models.adapters import Adapter
from duquant.models.moe import stack_expert_tensors

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class BlockStore(Protocol):
    """Where the decoder blocks live while a model is quantized."""

    whole_model: bool  # every block is in memory at once (global transforms possible)

    def embedding(self, model: nn.Module):
        """A context inside which the embedding is loaded."""

    def load(self, i: int) -> nn.Module:
        """Block `i`, in memory."""

    def release(self, i: int) -> None:
        """Block `i` is done with: keep it, or write it away and drop it."""


class InMemoryBlocks:
    """Every block already in memory: nothing to load or release."""

    whole_model = True

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks

    @contextmanager
    def embedding(self, model: nn.Module) -> Iterator[None]:
        """Nothing to load: the embedding is in memory."""
        yield

    def load(self, i: int) -> nn.Module:
        """Block `i` as it is."""
        return self.blocks[i]

    def release(self, i: int) -> None:
        """Nothing to do: the block stays."""


class SafetensorsCheckpoint:
    """Tensor names of a Hugging Face checkpoint folder and the shard holding each, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise FileNotFoundError(
                f"{self.path} holds no {SINGLE} or {INDEX}: streaming reads a Hugging Face "
                "checkpoint folder with safetensors weights"
            )
        self.weight_map: dict[str, str] = weight_map

    def names(self, prefix: str) -> list[str]:
        """Tensor names starting with `prefix`."""
        return [n for n in self.weight_map if n.startswith(prefix)]

    def load(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The named tensors, each shard opened once and closed again (its mapping released)."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_shard[self.weight_map[n]].append(n)
        out = {}
        for shard, shard_names in by_shard.items():
            with safe_open(self.path / shard, framework="pt", device=str(device)) as f:
                for n in shard_names:
                    out[n] = f.get_tensor(n)
        return out


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real: RoPE frequencies)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of checkpoint folder `path` with no weights loaded (parameters on meta), eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _assign(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """Load `tensors` (names relative to `module`) into it, replacing meta parameters."""
    expected = set(module.state_dict())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"checkpoint tensors of {what} do not match the model (missing {missing[:4]}, "
            f"unexpected {extra[:4]}): streaming needs a checkpoint in transformers' own layout"
        )
    dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    tensors = {k: t.to(dtypes[k]) for k, t in tensors.items()}
    module.load_state_dict(tensors, assign=True, strict=True)
    for p in module.parameters():
        p.requires_grad_(False)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers (RoPE frequencies) to `device`; meta parameters cannot move."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def _to_meta(module: nn.Module) -> None:
    """Drop `module`'s parameters (they become meta tensors of the same shape)."""
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(p.to("meta"), requires_grad=False))


class StreamedBlocks:
    """Blocks loaded from a safetensors checkpoint one at a time; quantized ones kept in `work_dir`.

    `load(i)` returns block i quantized when `work_dir` has it, else in full precision from the
    checkpoint; `release(i)` writes a block that was quantized in memory to `work_dir` and drops it.
    """

    whole_model = False

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        checkpoint: SafetensorsCheckpoint,
        work_dir: str | Path,
        device: str | torch.device = "cpu",
    ):
        self.model, self.adapter, self.checkpoint = model, adapter, checkpoint
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.blocks = adapter.blocks(model)
        self._from_disk: set[int] = set()
        _buffers_to(model, self.device)

    def block_file(self, i: int) -> Path:
        """Where quantized block `i` is kept."""
        return self.work_dir / f"block_{i:05d}.pt"

    def _load_outer(self, name: str) -> None:
        """Load the top-level module `name` (embedding, final norm, head) from the checkpoint."""
        module = self.model.get_submodule(name)
        names = self.checkpoint.names(name + ".")
        if not names and name == self.adapter.lm_head:  # tied to the embedding
            names = self.checkpoint.names(self.adapter.embed + ".")
            tensors = {n.removeprefix(self.adapter.embed + "."): t for n, t in self._read(names)}
        else:
            tensors = {n.removeprefix(name + "."): t for n, t in self._read(names)}
        _assign(module, tensors, name)

    def _read(self, names: list[str]):
        """(name, tensor) pairs of `names`, read onto the store's device."""
        return self.checkpoint.load(names, self.device).items()

    @contextmanager
    def outer(self, names: list[str]) -> Iterator[None]:
        """The top-level modules `names` (embedding, final norm, head) loaded for the duration."""
        try:
            for name in names:
                self._load_outer(name)
            yield
        finally:
            for name in names:
                _to_meta(self.model.get_submodule(name))

    def embedding(self, model: nn.Module):
        """The embedding loaded for the duration (what runs before block 0)."""
        return self.outer([self.adapter.embed])

    def head(self):
        """The final norm and the head loaded for the duration (what runs after the last block)."""
        return self.outer([self.adapter.final_norm, self.adapter.lm_head])

    def generation_config(self):
        """The source checkpoint's generation config, None if it has none."""
        from transformers import GenerationConfig

        if not (self.checkpoint.path / "generation_config.json").is_file():
            return None
        return GenerationConfig.from_pretrained(self.checkpoint.path)

    def load(self, i: int) -> nn.Module:
        """Block `i`: quantized from the work folder if there, else from the checkpoint."""
        path = self.block_file(i)
        if path.is_file():
            block = torch.load(path, map_location=self.device, weights_only=False)
            _reattach_cache_reset(block)
            self._from_disk.add(i)
        else:
            block = self.blocks[i]
            prefix = f"{self.adapter.layers}.{i}."
            tensors = {
                n.removeprefix(prefix): t for n, t in self._read(self.checkpoint.names(prefix))
            }
            if self.adapter.fused_experts:
                tensors = stack_expert_tensors(tensors, self.adapter.experts)
            _assign(block, tensors, f"block {i}")
        self.blocks[i] = block
        return block

    def release(self, i: int) -> None:
        """Write quantized block `i` to the work folder (unless it came from there); drop it."""
        from duquant.qlinear import QuantLinear

        block = self.blocks[i]
        quantized = any(isinstance(m, QuantLinear) for m in block.modules())
        if i not in self._from_disk and quantized:  # a full-precision block is re-read instead
            _save_block(block, self.block_file(i))
        self._from_disk.discard(i)
        self.blocks[i] = _Released(i)
        del block
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS would grow block
    by block: a block's 16 MiB tensors fall under glibc's adaptive mmap threshold)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _Released(nn.Module):
    """Placeholder of a block whose weights are on disk."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"block {self.index} is on disk: load it through its BlockStore")


def _save_block(block: nn.Module, path: Path) -> None:
    """Pickle `block` to `path` atomically, without its forward hooks (local functions)."""
    from duquant.qlinear import InputQuantizer

    for m in block.modules():
        if isinstance(m, InputQuantizer):
            m.reset()  # drops the weak reference to the last input (not picklable)
    hooks = block._forward_hooks
    block._forward_hooks = OrderedDict()  # the cache-reset hook is re-attached on load
    try:
        tmp = path.with_suffix(".tmp")
        torch.save(block, tmp)
        tmp.replace(path)
    finally:
        block._forward_hooks = hooks


def _reattach_cache_reset(block: nn.Module) -> None:
    """Re-register the hook that drops the InputQuantizers' cached activations after a forward."""
    from duquant.qlinear import reset_caches_after_forward

    reset_caches_after_forward(block)


def activation_bytes(n_windows: int, seqlen: int, hidden: int, dtype=torch.float32) -> int:
    """Calibration activations held at once: a block's inputs and outputs for every window."""
    return 2 * n_windows * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()


def open_streamed(
    path: str | Path, work_dir: str | Path, device: str = "cpu", dtype=torch.float32
) -> tuple[nn.Module, Adapter, StreamedBlocks]:
    """An empty model of checkpoint folder `path`, its adapter and a block store over `work_dir`."""
    from duquant.models.adapters import adapter_for

    checkpoint = SafetensorsCheckpoint(path)
    model = empty_model(path, dtype)
    adapter = adapter_for(model)
    return model, adapter, StreamedBlocks(model, adapter, checkpoint, work_dir, device)


__all__ = [
    "BlockStore",
    "InMemoryBlocks",
    "SafetensorsCheckpoint",
    "StreamedBlocks",
    "activation_bytes",
    "empty_model",
    "open_streamed",
]
