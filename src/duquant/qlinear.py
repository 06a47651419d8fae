"""W4A4 quantized linear layers: weights quantized once, activations transformed and quantized online."""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from duquant.formats import QuantizedWeight, QuantSpec
from duquant.transforms.base import BlockRotation, Sequence, Transform

TRITON_ENV = "DUQUANT_TRITON"  # 1: the fused Triton rotation + MXFP4 kernel where it applies


def _fresh(y: Tensor, x: Tensor) -> bool:
    """Whether `y` (an online transform's output) owns its memory, apart from the layer input `x`,
    and autograd does not need it: then quantizing it in place is safe."""
    if y is x or y.requires_grad:
        return False
    return y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def ste_fake_quant(x: Tensor, spec: QuantSpec | None, name: str = "train") -> Tensor:
    """Fake-quantize `x` in the forward pass; the identity in the backward (straight-through)."""
    if spec is None:
        return x
    q = spec.fake_quant(x.detach().float(), name=name).to(x.dtype)
    return x + (q - x).detach()


class InputQuantizer(nn.Module):
    """Online part of one input position: transform then fake-quantize, shared by the linears reading it.

    q/k/v (and gate/up) receive the same tensor object, so the result of the last call is reused when
    the same tensor comes again, and the online work is done once per position, not once per linear.
    """

    def __init__(
        self,
        online: Transform | None,
        spec: QuantSpec | None,
        name: str = "input",
        clip: float | None = None,
    ):
        super().__init__()
        self.online = online
        self.spec = spec
        self.name = name
        self.clip = (
            clip  # learned clip ratio of every group's maximum (FlatQuant); None: no clipping
        )
        self._last_input: weakref.ref | None = None
        self._last_output: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._last_input is not None and self._last_input() is x:
            return self._last_output
        y = None if self.clip is not None else _fused(x, self.online, self.spec)
        if y is None:
            y = self.online.apply_online(x) if self.online is not None else x
            if self.spec is None:
                pass
            elif self.clip is not None:
                y = self.spec.fake_quant_clipped(y, self.clip).to(y.dtype)
            elif x.requires_grad and torch.is_grad_enabled():
                # training through the quantized model (norm tweaking): straight-through
                y = ste_fake_quant(y, self.spec, self.name)
            else:
                # `spec.fake_quant`, but quantizing the transform's fresh output in place: one
                # activation-sized allocation (and its page faults) less per input position
                y = self.spec.codec.quantize_dequantize(
                    y,
                    self.spec.scale_rule,
                    self.spec.rounding,
                    name=self.name,
                    inplace=_fresh(y, x),
                )
        self._last_input, self._last_output = weakref.ref(x), y
        return y

    def reset(self) -> None:
        """Drop the cached activation."""
        self._last_input, self._last_output = None, None


def _fused_rotation(online: Transform | None) -> tuple[bool, Tensor | None]:
    """(whether `online` is a single 32 x 32 block rotation or nothing, its matrix)."""
    if online is None:
        return True, None
    if isinstance(online, Sequence) and len(online) == 1:
        online = online.steps[0]
    if isinstance(online, BlockRotation) and online.block_size == 32:
        return True, online.rotation
    return False, None


def _fused(x: Tensor, online: Transform | None, spec: QuantSpec | None) -> Tensor | None:
    """The Triton kernel's output when $DUQUANT_TRITON=1 and it covers this position, else None.

    Covered: MXFP4 with the `ocp`, `ceil` or `ct-round` rule, online part a 32 x 32 block rotation
    (DuQuant++, block Hadamard) or none, CUDA tensors (CPU ones only in Triton's interpreter).
    """
    if spec is None or os.environ.get(TRITON_ENV, "") != "1":
        return None
    from duquant.kernels import triton_mx

    if not (triton_mx.triton_available() and triton_mx.supports_spec(spec)):
        return None
    if x.device.type != "cuda" and not triton_mx.interpreter_on():
        return None
    ok, rotation = _fused_rotation(online)
    if not ok or x.requires_grad:
        return None
    y = triton_mx.rotate_quantize_mxfp4(x, rotation, spec.scale_rule, spec.rounding)
    return y.to(x.dtype)


class QuantLinear(nn.Module):
    """y = Q_a(T(x)) · Q_w(W·T^-T)^T + b, with T the online transform of this input position.

    `qweight` keeps the codes and scales `weight` decodes from (None while GPTQ has yet to
    quantize it, or when weights stay in full precision): the exporters write those.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        input_quantizer: InputQuantizer,
        qweight: QuantizedWeight | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.qweight = qweight
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.input_quantizer = input_quantizer
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight.to(x.dtype), self.bias)

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        """Take `qweight` as this layer's weight: its codes and scales, and their decoded values."""
        self.qweight = qweight
        self.weight.data = qweight.dequantize().to(self.weight.dtype)

    def extra_repr(self) -> str:
        iq = self.input_quantizer
        clip = "" if iq.clip is None else f", act_clip={iq.clip:.4f}"
        return f"in={self.in_features}, out={self.out_features}, act={iq.spec}{clip}"


def reset_caches_after_forward(module: nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Drop the InputQuantizers' cached activations once `module` (a decoder block) has run.

    The cache only serves the linears of one forward; kept afterwards, every block would hold its
    last activations (27 MiB a block at 2048 tokens for SmolLM2) for the life of the model.
    """
    iqs = list({id(m): m for m in module.modules() if isinstance(m, InputQuantizer)}.values())
    if not iqs:
        return None

    def hook(_module, _args, _out) -> None:
        for iq in iqs:
            iq.reset()

    return module.register_forward_hook(hook)


def quantize_weight(
    w: Tensor, spec: QuantSpec | None, name: str, clip: Tensor | None = None
) -> Tensor:
    """RTN weight quantization along the input dim (no-op when `spec` is None), with a per-row
    clip ratio [out, 1] when given."""
    if spec is None:
        return w
    if clip is not None:
        return spec.fake_quant_clipped(w.float(), clip).to(w.dtype)
    return spec.fake_quant(w.float(), name=name).to(w.dtype)


@torch.no_grad()
def make_quant_linear(
    linear: nn.Linear,
    transform: Transform | None,
    input_quantizer: InputQuantizer,
    weight_spec: QuantSpec | None,
    name: str,
    weight: Tensor | None = None,
    clip: Tensor | None = None,
) -> QuantLinear:
    """Transform `linear`'s weight offline, quantize it (RTN unless `weight` is given) and wrap it;
    `clip` [out, 1] scales each row's group maxima before the scale rule (learned clipping)."""
    qweight = None
    if weight is None:
        w = linear.weight.float()
        if transform is not None:
            w = transform.weight(w)
        weight = w
        if weight_spec is not None:
            qweight = weight_spec.quantize_weight(w, name, clip=clip)
            weight = qweight.dequantize()  # spec.fake_quant(w) bit for bit (tested)
    return QuantLinear(weight.to(linear.weight.dtype), linear.bias, input_quantizer, qweight)
