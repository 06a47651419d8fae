"""Models larger than memory: quantize block by block with only the current block's weights loaded.

The model is built with every parameter on the meta device (no memory); buffers such as RoPE
frequencies are real. Weights come from the safetensors shards lazily: the embedding while the
calibration inputs are captured, then one decoder block at a time. A quantized block is written to
the work folder (`block_00012.pt`: tensors and a JSON description read with
`torch.load(weights_only=True)`, never unpickled) and dropped before the next one is loaded;
evaluation streams the quantized blocks back the same way. A work folder records what its blocks
depend on (`duquant-work.json`: the checkpoint's fingerprint, the run's settings, the versions, each
block file's sha256): a later run of the same fingerprint reuses them, any other run is refused. The calibration activations (the inputs and outputs of the
current block for every window) are the only other thing held: `activation_bytes` states it.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import importlib
import json
import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from duquant.data import file_sha256
from duquant.jsonio import read_json_object, write_json
from duquant.models.adapters import Adapter
from duquant.models.moe import stack_expert_tensors

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def copy_block(block: nn.Module) -> nn.Module:
    """A deep copy of `block` that shares its modules' configs (the model's): what the model's
    config switches (the attention implementation, as token shares do) reaches the copy too."""
    memo: dict[int, object] = {}
    for m in block.modules():
        c = getattr(m, "config", None)
        if c is not None and not isinstance(c, (nn.Module, Tensor)):
            memo[id(c)] = c
    return copy.deepcopy(block, memo)


class BlockStore(Protocol):
    """Where the decoder blocks live while a model is quantized."""

    whole_model: bool  # every block is in memory at once (global transforms possible)

    def embedding(self, model: nn.Module):
        """A context inside which the embedding is loaded."""

    def load(self, i: int) -> nn.Module:
        """Block `i`, in memory."""

    def release(self, i: int) -> None:
        """Block `i` is done with: keep it, or write it away and drop it."""

    def head(self):
        """A context inside which the final norm and the head are loaded."""

    def reused(self) -> bool:
        """Whether blocks quantized by an earlier run are loaded instead of the model's own."""

    def update(self, i: int) -> None:
        """Loaded block `i` was changed in place: its release must keep the change."""

    def set_outer(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Tensors of top-level module `name` that stay changed whenever it is loaded."""


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

    @contextmanager
    def head(self) -> Iterator[None]:
        """Nothing to load: the final norm and the head are in memory."""
        yield

    def reused(self) -> bool:
        """Nothing is reused: the blocks are the model's own."""
        return False

    def update(self, i: int) -> None:
        """Nothing to do: a block changed in place stays changed."""

    def set_outer(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Nothing to do: a top-level module changed in place stays changed."""


class ScratchBlocks:
    """Another store's blocks, each handed out as a copy that is dropped on release: a quantization
    through it leaves the model as it was and holds one extra block at a time (a planning pass:
    duquant++e2e's searched starting plans), where a copy of the whole model held them all."""

    def __init__(self, inner: BlockStore):
        self.inner = inner
        self.whole_model = inner.whole_model
        self._copies: dict[int, nn.Module] = {}

    def embedding(self, model: nn.Module):
        """The inner store's embedding (read, never changed here)."""
        return self.inner.embedding(model)

    def load(self, i: int) -> nn.Module:
        """A copy of the inner store's block `i` (whose own is released unchanged)."""
        self._copies[i] = copy_block(self.inner.load(i))
        self.inner.release(i)
        return self._copies[i]

    def release(self, i: int) -> None:
        """Drop the copy."""
        self._copies.pop(i, None)

    def head(self):
        """The inner store's final norm and head."""
        return self.inner.head()

    def reused(self) -> bool:
        """As the inner store."""
        return self.inner.reused()

    def update(self, i: int) -> None:
        """Nothing to keep: a copy's changes are dropped with it."""

    def set_outer(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Nothing to keep: a scratch pass leaves the model's top-level modules as they are."""


class SafetensorsCheckpoint:
    """Tensor names of a Hugging Face checkpoint folder and the shard holding each, read lazily."""

    def __init__(self, path: str | Path):
        from duquant.models.loading import check_weight_files, safetensors_index

        self.path = Path(path)
        if not (self.path / INDEX).is_file() and not (self.path / SINGLE).is_file():
            raise FileNotFoundError(
                f"{self.path} holds no {SINGLE} or {INDEX}: streaming reads a Hugging Face "
                "checkpoint folder with safetensors weights"
            )
        check_weight_files(self.path)  # every shard's header, the index: one line naming a file
        weight_map = safetensors_index(self.path)
        if weight_map is None:
            from safetensors import safe_open

            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
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
                    t = out[n] = f.get_tensor(n)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        from duquant.models.loading import ModelSourceError

                        raise ModelSourceError(
                            f"{self.path / shard}: tensor {n} holds NaN or Inf values"
                        )
        return out

    def file_of(self, name: str) -> Path:
        """The shard holding tensor `name`."""
        return self.path / self.weight_map.get(name, SINGLE)


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
    from transformers import AutoModelForCausalLM

    from duquant.models.loading import ModelSourceError, load_config

    config = load_config(path)  # or one line naming config.json
    try:
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, OSError, TypeError, KeyError, AttributeError, ZeroDivisionError) as exc:
        why = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        raise ModelSourceError(f"{Path(path) / 'config.json'}: {why}") from None
    return model.eval()


def _assign(
    module: nn.Module, tensors: dict[str, Tensor], what: str, where=None, prefix: str = ""
) -> None:
    """Load `tensors` (names relative to `module`) into it, replacing meta parameters; `where`
    (a name -> file function) names the file of a tensor of the wrong shape or kind."""
    from duquant.models.loading import ModelSourceError

    expected = set(module.state_dict())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        full = [f"{prefix}{k}" for k in missing[:4]], [f"{prefix}{k}" for k in extra[:4]]
        file = ""
        if where is not None:
            file = f"{where(next(iter(sorted(tensors)), '') or '')}: "
        raise ModelSourceError(
            f"{file}checkpoint tensors of {what} do not match the model (missing {full[0]}, "
            f"unexpected {full[1]}): streaming needs a checkpoint in transformers' own layout"
        )
    for k, v in module.state_dict().items():
        t = tensors[k]
        if t.shape != v.shape or t.is_floating_point() != v.is_floating_point():
            file = f"{where(k)}: " if where is not None else ""
            raise ModelSourceError(
                f"{file}tensor {k} of {what} is {str(t.dtype).removeprefix('torch.')} "
                f"{list(t.shape)}, the model expects {str(v.dtype).removeprefix('torch.')} "
                f"{list(v.shape)}; the weights do not match config.json"
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
        fingerprint: dict | None = None,
    ):
        self.model, self.adapter, self.checkpoint = model, adapter, checkpoint
        self.work_dir = Path(work_dir)
        self.device = torch.device(device)
        self.blocks = adapter.blocks(model)
        self._from_disk: set[int] = set()
        # top-level tensors changed after loading (a trained final norm): name -> {tensor: value}
        self._outer_set: dict[str, dict[str, Tensor]] = {}
        # blocks kept in the work folder: index -> sha256 of the file as written (by this run, or
        # by an earlier run of the same fingerprint); any other file there is never read
        self._digests: dict[int, str] = {}
        self.fingerprint = fingerprint
        if fingerprint is not None:  # the folder is written to when the first block is kept
            self._digests = claim_work_dir(self.work_dir, fingerprint)
        else:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        _buffers_to(model, self.device)
        # each block as built (parameters on meta): the structure a kept block is read back into
        self._pristine = [copy_block(b) for b in self.blocks]

    def block_file(self, i: int) -> Path:
        """Where quantized block `i` is kept."""
        return self.work_dir / f"block_{i:05d}.pt"

    def _kept(self, i: int) -> bool:
        """Whether quantized block `i` is in the work folder, written by this run (or its twin)."""
        return i in self._digests and self.block_file(i).is_file()

    def _write_manifest(self) -> None:
        """Record the kept blocks' digests beside the fingerprint (with one; atomically)."""
        if self.fingerprint is not None:
            write_json(_manifest(self.fingerprint, self._digests), self.work_dir / MANIFEST)

    def _load_outer(self, name: str) -> None:
        """Load the top-level module `name` (embedding, final norm, head) from the checkpoint."""
        module = self.model.get_submodule(name)
        names = self.checkpoint.names(name + ".")
        prefix = name + "."
        if not names and name == self.adapter.lm_head and self._tied():  # the embedding's
            prefix = self.adapter.embed + "."
            names = self.checkpoint.names(prefix)
        tensors = {n.removeprefix(prefix): t for n, t in self._read(names)}
        _assign(module, tensors, name, lambda k: self.checkpoint.file_of(prefix + k), prefix)
        with torch.no_grad():
            for k, t in self._outer_set.get(name, {}).items():
                module.get_parameter(k).copy_(t)

    def _tied(self) -> bool:
        """Whether the config ties the head to the embedding (else a missing head is refused)."""
        config = self.model.config
        text = getattr(config, "get_text_config", lambda **_: config)()
        return bool(
            getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
        )

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
        if self._kept(i):
            block = _load_block(path, self._pristine[i], self.device, self._digests.get(i))
            _reattach_cache_reset(block)
            self._from_disk.add(i)
        else:
            block = self.blocks[i]
            if isinstance(block, _Released):  # dropped in full precision: read it again
                block = copy_block(self._pristine[i])
            prefix = f"{self.adapter.layers}.{i}."
            tensors = {
                n.removeprefix(prefix): t for n, t in self._read(self.checkpoint.names(prefix))
            }
            if self.adapter.fused_experts:
                tensors = stack_expert_tensors(tensors, self.adapter.experts)
            where = lambda k: self.checkpoint.file_of(prefix + k)  # noqa: E731
            _assign(block, tensors, f"block {i}", where, prefix)
        self.blocks[i] = block
        return block

    def reused(self) -> bool:
        """Whether quantized blocks of an earlier run of the same fingerprint are being reused."""
        return any(self._kept(i) for i in range(len(self.blocks)))

    def update(self, i: int) -> None:
        """Loaded block `i` was changed in place (norm tweaking): `release` writes it again."""
        self._from_disk.discard(i)

    def set_outer(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Tensors of top-level module `name` (a trained final norm) that replace the checkpoint's
        whenever it is loaded from now on (evaluation, export)."""
        self._outer_set[name] = {k: t.detach().clone() for k, t in tensors.items()}

    def release(self, i: int) -> None:
        """Write quantized block `i` to the work folder (unless it came from there); drop it."""
        from duquant.qlinear import QuantLinear

        block = self.blocks[i]
        quantized = any(isinstance(m, QuantLinear) for m in block.modules())
        if i not in self._from_disk and quantized:  # a full-precision block is re-read instead
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._digests.pop(i, None)
            self._write_manifest()  # the fingerprint is there before any block file
            self._digests[i] = _save_block(block, self.block_file(i), self._pristine[i])
            self._write_manifest()
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


# ----------------------------------------------------------------------------- kept blocks
#
# A quantized block is kept as a plain torch file that `torch.load(weights_only=True)` reads: a dict
# of tensors and a JSON text describing the duquant objects that hold them (QuantLinear, its input
# quantizer and online transform, the quantized weight). Nothing is unpickled: the transformers
# modules are the block's own skeleton (built from config.json), only their tensors and duquant
# children come from the file, and the duquant classes named there must be classes of duquant
# (or torch containers); a file that is not exactly what was written is refused in one line.

BLOCK_FORMAT = 1
# torch classes a duquant object may hold besides its own
_TORCH_CLASSES = {
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.linear.Linear",
}
_HOOK_KEYS = {k for k in nn.Module().__dict__ if "hook" in k}


class WorkDirError(ValueError):
    """A work folder (or a block file in it) that cannot be used: the message names it."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ours(cls: type) -> bool:
    """A class whose objects a kept block describes in full (duquant's own, torch containers)."""
    name = _class_name(cls)
    return name.startswith("duquant.") or name in _TORCH_CLASSES


def _resolve(name: str) -> type:
    """The class named `name`, only when it is one of `_ours` (never anything else)."""
    if not isinstance(name, str) or not (name.startswith("duquant.") or name in _TORCH_CLASSES):
        raise ValueError(f"class {name!r} is not one of duquant's")
    module, _, qual = name.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            qual = f"{head}.{qual}"
    else:
        raise ValueError(f"class {name!r} not found")
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or _class_name(obj) != name or not _ours(obj):
        raise ValueError(f"class {name!r} not found")
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Encoder:
    """A block as (tensors, a JSON-able description); the transformers modules by their path."""

    def __init__(self, pristine: nn.Module):
        self.pristine = pristine
        self.tensors: dict[str, Tensor] = {}
        self.objects: list[dict] = []
        self.ids: dict[int, int] = {}
        self.tensor_ids: dict[int, str] = {}

    def tensor(self, t: Tensor) -> dict:
        """A reference to tensor `t`, stored once however often it is shared."""
        if id(t) not in self.tensor_ids:
            name = f"t{len(self.tensors)}"
            self.tensor_ids[id(t)] = name
            self.tensors[name] = t.detach()
        name = self.tensor_ids[id(t)]
        return {
            "T": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "param": isinstance(t, nn.Parameter),
            "grad": bool(t.requires_grad),
        }

    def value(self, v, where: str):
        """The JSON form of an attribute value (plain data, a tensor or one of our objects)."""
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"F": repr(v)}
        if isinstance(v, Tensor):
            return self.tensor(v)
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, (list, tuple)):
            return {"L" if isinstance(v, list) else "U": [self.value(x, where) for x in v]}
        if isinstance(v, (set, frozenset)) and all(isinstance(x, str) for x in v):
            return {"S": sorted(v)}
        if isinstance(v, dict) and v and all(isinstance(k, torch.device) for k in v):
            return {"D": []}  # a per-device cache (BlockRotation._stored): recomputed when used
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"D": [[k, self.value(x, _join(where, k))] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"slice": [self.value(x, where) for x in (v.start, v.stop, v.step)]}
        return {"O": self.obj(v, where)}

    def obj(self, o, where: str) -> int:
        """The index of object `o` in the description (described once, by class and state)."""
        if id(o) in self.ids:
            return self.ids[id(o)]
        index = len(self.objects)
        self.ids[id(o)] = index
        entry: dict = {"cls": _class_name(type(o))}
        self.objects.append(entry)
        if isinstance(o, nn.Module) and not _ours(type(o)):
            # a transformers module: the skeleton's own at this path, with its tensors and children
            try:
                twin = self.pristine.get_submodule(where) if where else self.pristine
            except AttributeError:
                twin = None
            if type(twin) is not type(o):
                raise TypeError(f"{where or 'the block'} ({entry['cls']}) is not in the skeleton")
            entry["path"] = where
            for key in ("_parameters", "_buffers", "_modules"):
                entry[key] = self.value(getattr(o, key), where)
            for key in set(o.__dict__) | set(twin.__dict__):
                if key.startswith("_") or key == "training":
                    continue
                a, b = o.__dict__.get(key), twin.__dict__.get(key)
                if isinstance(a, nn.Module) or type(a) is not type(b):
                    raise TypeError(f"{where}.{key} differs from the skeleton's")
                if isinstance(a, (bool, int, float, str)) and a != b:
                    raise TypeError(f"{where}.{key} differs from the skeleton's")
            entry["_non_persistent"] = sorted(o._non_persistent_buffers_set)
            return index
        if not _ours(type(o)) or hasattr(type(o), "__slots__") and not hasattr(o, "__dict__"):
            raise TypeError(f"{where}: a {entry['cls']} cannot be kept")
        state = {k: v for k, v in vars(o).items() if k not in _HOOK_KEYS}
        if isinstance(o, nn.Module):
            children = state.pop("_modules")
            entry["_modules"] = {
                "D": [
                    [k, self.value(c, f"{where}.{k}" if where else k)] for k, c in children.items()
                ]
            }
        entry["state"] = self.value(state, where)
        return index


def _check_tensor(name: str, t: Tensor, path: Path) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it and its file."""
    if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
        raise WorkDirError(f"{path}: tensor {name} holds NaN or Inf values")


class _Decoder:
    """The inverse of `_Encoder`, over a fresh copy of the block's skeleton."""

    def __init__(self, tensors: dict, objects: list, pristine: nn.Module, path: Path):
        self.tensors, self.objects, self.pristine, self.path = tensors, objects, pristine, path
        self.built: dict[int, object] = {}

    def value(self, v):
        """An attribute value back from its JSON form, checked as it is read."""
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if not isinstance(v, dict) or len(v) == 0:
            raise ValueError(f"unexpected entry {str(v)[:40]}")
        if "T" in v:
            t = self.tensors.get(v["T"])
            if not isinstance(t, Tensor):
                raise ValueError(f"tensor {v['T']!r} missing")
            if list(t.shape) != v["shape"] or str(t.dtype).removeprefix("torch.") != v["dtype"]:
                raise ValueError(f"tensor {v['T']} is not of the shape and dtype recorded")
            _check_tensor(v["T"], t, self.path)
            return nn.Parameter(t, requires_grad=bool(v["grad"])) if v["param"] else t
        (kind, x), *rest = v.items()
        if rest:
            raise ValueError(f"unexpected entry {str(v)[:40]}")
        if kind == "F":
            return float({"nan": "nan", "inf": "inf", "-inf": "-inf"}[x])
        if kind == "dtype":
            dt = getattr(torch, x)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {x!r}")
            return dt
        if kind == "device":
            return torch.device(x)
        if kind in ("L", "U"):
            items = [self.value(e) for e in x]
            return items if kind == "L" else tuple(items)
        if kind == "S":
            return {str(e) for e in x}
        if kind == "D":
            return OrderedDict((str(k), self.value(e)) for k, e in x)
        if kind == "slice":
            return slice(*(self.value(e) for e in x))
        if kind == "O":
            return self.obj(x)
        raise ValueError(f"unexpected entry kind {kind!r}")

    def obj(self, index: int):
        """Object `index`, built once (only our classes and a few torch containers)."""
        if not isinstance(index, int) or not 0 <= index < len(self.objects):
            raise ValueError(f"object {index!r} out of range")
        if index in self.built:
            return self.built[index]
        entry = self.objects[index]
        if "path" in entry:  # a transformers module of the skeleton
            o = self.pristine.get_submodule(entry["path"]) if entry["path"] else self.pristine
            if _class_name(type(o)) != entry["cls"]:
                raise ValueError(f"{entry['path']} is a {type(o).__name__}, not {entry['cls']}")
            self.built[index] = o
            for key in ("_parameters", "_buffers", "_modules"):
                setattr(o, key, self.value(entry[key]))
            o._non_persistent_buffers_set = set(entry["_non_persistent"])
            return o
        cls = _resolve(entry["cls"])
        if dataclasses.is_dataclass(cls):  # built through its constructor, which checks it
            state = self.value(entry["state"])
            names = {f.name for f in dataclasses.fields(cls)}
            if set(state) != names:
                raise ValueError(f"{entry['cls']} fields {sorted(state)} are not {sorted(names)}")
            o = cls(**state)
            self.built[index] = o
            return o
        o = cls.__new__(cls)
        self.built[index] = o
        if isinstance(o, nn.Module):
            nn.Module.__init__(o)
            o.__dict__.update(self.value(entry["state"]))
            o._modules = self.value(entry["_modules"])
            if not all(isinstance(c, nn.Module) or c is None for c in o._modules.values()):
                raise ValueError(f"a child of {entry['cls']} is not a module")
        else:
            o.__dict__.update(self.value(entry["state"]))
        return o


def _save_block(block: nn.Module, path: Path, pristine: nn.Module) -> str:
    """Write `block` to `path` atomically as tensors and a description (no pickled objects),
    without its forward hooks (local functions); the sha256 of the file written."""
    from duquant.qlinear import InputQuantizer

    for m in block.modules():
        if isinstance(m, InputQuantizer):
            m.reset()  # drops the weak reference to the last input
    hooks = block._forward_hooks
    block._forward_hooks = OrderedDict()  # the cache-reset hook is re-attached on load
    try:
        enc = _Encoder(pristine)
        root = enc.obj(block, "")
        tree = json.dumps({"root": root, "objects": enc.objects})
        tmp = path.with_suffix(".tmp")
        torch.save({"format": BLOCK_FORMAT, "tree": tree, "tensors": enc.tensors}, tmp)
        digest = file_sha256(tmp)
        tmp.replace(path)
    finally:
        block._forward_hooks = hooks
    return digest


def _load_block(path: Path, pristine: nn.Module, device, digest: str | None) -> nn.Module:
    """Block kept at `path` (never unpickled: tensors and a description), over a copy of
    `pristine`; refused in one line unless it is the file written (sha256 `digest`)."""
    if digest is not None and file_sha256(path) != digest:
        raise WorkDirError(
            f"{path}: the block file changed since this run wrote it; remove the work folder"
        )
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line, never unpickled
        raise WorkDirError(
            f"{path}: not a block file duquant can read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); remove the work folder"
        ) from None
    try:
        if not isinstance(data, dict) or data.get("format") != BLOCK_FORMAT:
            raise ValueError("not a duquant block file of this version")
        tree, tensors = json.loads(data["tree"]), data["tensors"]
        if not isinstance(tensors, dict) or not isinstance(tree, dict):
            raise ValueError("malformed")
        dec = _Decoder(tensors, tree["objects"], copy_block(pristine), path)
        block = dec.obj(tree["root"])
        if not isinstance(block, nn.Module) or type(block) is not type(pristine):
            raise ValueError("its root is not the block")
        for name, t in block.state_dict().items():
            if t.device.type == "meta":
                raise ValueError(f"tensor {name} missing")
    except WorkDirError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise WorkDirError(
            f"{path}: not a block file duquant wrote ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); remove the work folder"
        ) from None
    return block


# ----------------------------------------------------------------------------- work folder

MANIFEST = "duquant-work.json"


def _manifest(fingerprint: dict, digests: dict[int, str]) -> dict:
    """The work folder's record: the run's fingerprint and each kept block file's sha256."""
    return {
        "fingerprint": fingerprint,
        "blocks": {f"block_{i:05d}.pt": d for i, d in sorted(digests.items())},
    }


FULL_HASH_BYTES = 64 << 20  # shards up to this size are hashed whole, larger ones sampled
SAMPLES, SAMPLE_BYTES = 64, 64 << 10


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of what identifies a safetensors checkpoint folder, cheaply: config.json, the index,
    every shard's name, size and header (tensor names, shapes, dtypes, offsets) and its data:
    whole up to 64 MiB, else 64 evenly spread 64 KiB samples (another fine-tune of the same
    architecture differs in every tensor, so in the samples)."""
    path = Path(path)
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.is_file()):
        if not (name.endswith(".safetensors") or name in ("config.json", INDEX)):
            continue
        f = path / name
        size = f.stat().st_size
        h.update(name.encode() + b"\0" + str(size).encode() + b"\0")
        if not name.endswith(".safetensors") or size <= FULL_HASH_BYTES:
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(chunk)
            continue
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + fh.read(min(n, 100 << 20)))
            for k in range(SAMPLES):
                fh.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


# settings of a run record (duquant.api.record) that do not change the quantized blocks
_NOT_IN_BLOCKS = {"model_source", "platform", "threads"}
_RUN_NOT_IN_BLOCKS = {
    "model", "seqlen", "max_windows", "c4_windows", "limit", "tasks", "batch_size",
    "zeroshot_source", "evals", "output", "save", "overwrite", "stream", "work_dir",
    "max_activation_mb",
}  # fmt: skip


def work_fingerprint(model_path: str | Path, record: dict) -> dict:
    """What the blocks of a work folder depend on: the checkpoint's identity, the run record's
    settings that change numbers (method, formats, weight quantizer, calibration, seed, dtype,
    device, numeric switches...), duquant's and torch's versions and the block file format."""
    from duquant import __version__

    run = {k: v for k, v in record.items() if k not in _NOT_IN_BLOCKS}
    if isinstance(run.get("run"), dict):
        run["run"] = {k: v for k, v in run["run"].items() if k not in _RUN_NOT_IN_BLOCKS}
    return {
        "checkpoint": checkpoint_fingerprint(model_path),
        "run": json.loads(json.dumps(run, sort_keys=True, default=str)),
        "duquant": __version__,
        "torch": torch.__version__,
        "block_format": BLOCK_FORMAT,
    }


def _differences(old, new, path: str = "") -> list[str]:
    """The settings (dotted names, the fingerprint's `run` record left out) where two
    fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            name = k if path in ("", "run", "run.run") else f"{path}.{k}"
            out += _differences(old.get(k), new.get(k), name if path else k)
        return list(dict.fromkeys(out))
    return [] if old == new else [path or "record"]


def claim_work_dir(work_dir: Path, fingerprint: dict) -> dict[int, str]:
    """The digests of the blocks an earlier run of the same fingerprint kept in `work_dir` (to
    reuse; the store records the fingerprint there with the first block it keeps); a folder holding
    anything of another run (or of an unknown one) is refused in one line, never reused and never
    emptied."""
    manifest = work_dir / MANIFEST
    if work_dir.is_dir():
        entries = [p.name for p in work_dir.iterdir()]
        if entries and MANIFEST not in entries:
            raise WorkDirError(
                f"--work-dir {work_dir} is not empty and holds no {MANIFEST} (not a duquant work "
                "folder, or one of an older version); give an empty folder or remove it"
            )
    elif work_dir.exists():
        raise WorkDirError(f"--work-dir {work_dir} is not a folder")
    digests: dict[int, str] = {}
    if manifest.is_file():
        try:
            data = read_json_object(manifest, 64 << 20)
            blocks = data["blocks"]
            old = data["fingerprint"]
            for name, d in blocks.items():
                if not (
                    isinstance(name, str) and name.startswith("block_") and name.endswith(".pt")
                ):
                    raise ValueError(f"unexpected entry {name[:40]!r}")
                if not (isinstance(d, str) and len(d) == 64):
                    raise ValueError(f"unexpected digest of {name}")
                digests[int(name[6:-3])] = d
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WorkDirError(
                f"{manifest}: not a work folder record duquant wrote ({type(exc).__name__}: "
                f"{exc}); give an empty --work-dir or remove it"
            ) from None
        if old != fingerprint:
            what = ", ".join(_differences(old, fingerprint)[:6]) or "record"
            raise WorkDirError(
                f"--work-dir {work_dir} holds blocks of another run (its {what} differ); give an "
                "empty folder or remove it"
            )
    return digests


def _reattach_cache_reset(block: nn.Module) -> None:
    """Re-register the hook that drops the InputQuantizers' cached activations after a forward."""
    from duquant.qlinear import reset_caches_after_forward

    reset_caches_after_forward(block)


def activation_bytes(n_windows: int, seqlen: int, hidden: int, dtype=torch.float32) -> int:
    """Calibration activations held at once: a block's inputs and outputs for every window."""
    return 2 * n_windows * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()


def open_streamed(
    path: str | Path,
    work_dir: str | Path,
    device: str = "cpu",
    dtype=torch.float32,
    fingerprint: dict | None = None,
) -> tuple[nn.Module, Adapter, StreamedBlocks]:
    """An empty model of checkpoint folder `path`, its adapter and a block store over `work_dir`
    (with `fingerprint`, see `work_fingerprint`: blocks kept there by an identical run reused,
    a folder of another run refused)."""
    from duquant.models.adapters import adapter_for

    checkpoint = SafetensorsCheckpoint(path)
    model = empty_model(path, dtype)
    adapter = adapter_for(model)
    return model, adapter, StreamedBlocks(model, adapter, checkpoint, work_dir, device, fingerprint)


__all__ = [
    "BlockStore",
    "InMemoryBlocks",
    "ScratchBlocks",
    "SafetensorsCheckpoint",
    "StreamedBlocks",
    "WorkDirError",
    "activation_bytes",
    "checkpoint_fingerprint",
    "claim_work_dir",
    "empty_model",
    "open_streamed",
    "work_fingerprint",
]
