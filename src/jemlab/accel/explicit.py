"""The energy gradient of a plain feed-forward network, written out by hand instead of taken by autograd.

SGLD needs ∇ₓE(x) and nothing else: no weight gradients, no graph kept between steps. For a network that is a
chain of convolutions, linear layers and point-wise activations (the course CNN, the default preset's CNN, the
MLP), that gradient is a short, fixed program:

    forward:   h₀ = x,  h_{l+1} = layer_l(h_l)          keeping each activation's input
    head:      g = ∂E/∂features                           (−w_h, −softmax(f)·W or −W[y], by the energy head)
    backward:  g ← layer_lᵀ(g) for l = L … 1              (transposed convolution, g·W, g·σ'(pre-activation))

Running that program directly, instead of through autograd, lets each piece take its fastest form on a CPU:

- **Transposed convolutions as stride-1 convolutions.** The input gradient of a stride-s convolution is a
  transposed convolution, which oneDNN runs 2–6× slower than a forward convolution of the same size here. By the
  sub-pixel identity it equals s² stride-1 convolutions, one per output phase, stacked as s²·C_in output channels
  and interleaved by a depth-to-space shuffle (Shi et al., 2016, "Real-time single image and video
  super-resolution using an efficient sub-pixel convolutional neural network"). `subpixel_weight` builds that
  kernel from the layer's weight; it is exact (`tests/test_explicit_gradient.py`).
- **Weights packed once per chain.** Every convolution, forward or backward, then runs through oneDNN's
  ``_convolution_pointwise`` with its weight reordered into oneDNN's blocked layout once, when the plan is built,
  instead of on every call. Parameters do not change during a chain; a plan is rebuilt when any parameter's
  version counter moves (an optimiser step).
- **One fused kernel per activation backward** (``silu_backward`` etc.) and no autograd bookkeeping. Where the
  next transposed convolution needs a zero-padded input, the activation backward writes straight into the interior
  of a padded buffer that the plan keeps (one per thread) instead of being copied by ``F.pad`` (2–7 % of a course
  CNN step here).

The packed convolutions and fused activation backwards are private torch operators (`jemlab.accel.private_ops`):
each is used only where the device probe (`jemlab.accel.probe`) found it working, in this dtype, on this machine;
otherwise the plan uses ``F.conv2d`` and the activations' derivatives written with public operators. On a CPU
without AVX-512, for example, oneDNN cannot pack bf16 weights, and a forced bf16 plan runs unpacked.

The plan is an optimisation, not a different model: `ExplicitGradient` returns the energies and input gradients
autograd returns, up to floating-point rounding. `explicit_support` names the reason for any network it does not
understand; `jemlab.accel.gradient` then uses autograd.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from jemlab.accel import private_ops
from jemlab.accel.probe import probe

# activation module type → its name in `private_ops.ACTIVATION_BACKWARD` (grad, pre-activation, slope, out) → out
_ACTIVATIONS: dict[type, str] = {nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu", nn.ReLU: "relu"}


# --- the sub-pixel identity ---------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _subpixel_geometry(k: int, s: int, p: int, size_in: int, size_out: int) -> tuple[torch.Tensor, int, int, int]:
    """Index map for `subpixel_weight` along one axis.

    The transposed convolution writes input position i = s·a + r (phase r, 0 ≤ r < s) from the output positions
    o with kernel tap t = i + p − s·o. Writing o = a + d − off for tap slots d = 0 … D−1 gives
    t = r + p + s·off − s·d, independent of a: a stride-1 correlation over the (padded) gradient map whose kernel
    for phase r holds tap t at slot d. Returns (taps[r, d] with k for "no tap", D, pad_before, pad_after).
    """
    off = max(0, -(-(k - 1 - p) // s))
    slots = off + (p + s - 1) // s + 2
    taps = torch.full((s, slots), k, dtype=torch.long)
    for r in range(s):
        for d in range(slots):
            t = r + p + s * off - s * d
            if 0 <= t < k:
                taps[r, d] = t
    used = [bool((taps[:, d] < k).any()) for d in range(slots)]
    first, last = used.index(True), slots - 1 - used[::-1].index(True)
    taps = taps[:, first : last + 1].contiguous()
    off -= first
    slots = last - first + 1
    phases = -(-size_in // s)  # positions per phase that the shuffle produces (cropped to size_in afterwards)
    pad_after = (phases - 1 + slots - 1 - off) - (size_out - 1)
    return taps, slots, off, pad_after


def subpixel_weight(weight: torch.Tensor, stride: int, padding: int, size_in: int, size_out: int):
    """The stride-1 kernel K and paddings with which

        depth_to_space(conv2d(pad(g), K), stride)[..., :size_in, :size_in] == conv_transpose2d(g, weight, stride,
        padding, output_padding)

    for a square (C_out, C_in, k, k) weight. K has s²·C_in output channels ordered (phase_y, phase_x, c_in).

    Returns:
        (K of shape (s²·C_in, C_out, D, D), pad_before, pad_after); a negative padding crops.
    """
    c_out, c_in, k, _ = weight.shape
    index, before, after = _subpixel_index(c_out, c_in, k, stride, padding, size_in, size_out)
    # one gather from the flattened weight plus a trailing zero (the "no tap" entry): this runs once per chain
    flat = torch.cat([weight.reshape(-1), weight.new_zeros(1)])
    return flat[index], before, after


@lru_cache(maxsize=64)
def _subpixel_index(
    c_out: int, c_in: int, k: int, s: int, p: int, size_in: int, size_out: int
) -> tuple[torch.Tensor, int, int]:
    """Flat indices into (weight.flatten(), 0) that lay out the sub-pixel kernel (s²·C_in, C_out, D, D) directly."""
    taps, slots, before, after = _subpixel_geometry(k, s, p, size_in, size_out)
    ty = taps.view(s, 1, 1, 1, slots, 1)  # (ry, rx, c_in, c_out, dy, dx) broadcast axes
    tx = taps.view(1, s, 1, 1, 1, slots)
    ci = torch.arange(c_in).view(1, 1, c_in, 1, 1, 1)
    co = torch.arange(c_out).view(1, 1, 1, c_out, 1, 1)
    index = ((co * c_in + ci) * k + ty) * k + tx
    index = torch.where((ty < k) & (tx < k), index, c_out * c_in * k * k)  # the trailing zero
    return index.reshape(s * s * c_in, c_out, slots, slots), before, after


def depth_to_space(y: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, s²·C, H, W) with channels ordered (phase_y, phase_x, c) → (N, C, s·H, s·W); keeps channels-last."""
    n, cs, h, w = y.shape
    c = cs // (stride * stride)
    if _is_nhwc(y):
        nhwc = y.permute(0, 2, 3, 1).reshape(n, h, w, stride, stride, c)
        out = nhwc.permute(0, 1, 3, 2, 4, 5).reshape(n, h * stride, w * stride, c)
        return out.permute(0, 3, 1, 2)  # an NHWC-contiguous tensor in NCHW order
    out = y.reshape(n, stride, stride, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return out.reshape(n, c, h * stride, w * stride)


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclass
class _Conv:
    weight: torch.Tensor  # packed (oneDNN) or plain, forward direction
    bias: torch.Tensor | None
    stride: int
    padding: int
    back: torch.Tensor  # sub-pixel kernel, packed or plain
    back_pad: tuple[int, int]
    size_in: int
    packed: bool

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return private_ops.packed_conv2d(h, self.weight, self.bias, self.padding, self.stride)
        return F.conv2d(h, self.weight, self.bias, self.stride, self.padding)

    @property
    def pads_input(self) -> bool:
        """Whether the backward zero-pads its input (rather than using it as it is, or cropping it)."""
        before, after = self.back_pad
        return before >= 0 and after >= 0 and (before > 0 or after > 0)

    def padded_input(self, local: threading.local, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero-padded buffer, its interior) for this layer's backward input, shaped and laid out like `like`.

        The buffer is this thread's own and is kept between calls: its border stays zero and the interior is
        overwritten, so the gradient is written straight into place instead of being copied by F.pad."""
        before, after = self.back_pad
        cached = local.__dict__.get(id(self))
        if cached is None:
            n, c, h, w = like.shape
            buffer = torch.zeros((n, c, h + before + after, w + before + after), dtype=like.dtype, device=like.device)
            if _is_nhwc(like):
                buffer = buffer.contiguous(memory_format=torch.channels_last)
            cached = (buffer, buffer[..., before : before + h, before : before + w])
            local.__dict__[id(self)] = cached
        return cached

    def backward(self, g: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """The input gradient from the output gradient g (already zero-padded by the caller when `padded`)."""
        before, after = self.back_pad
        if (before or after) and not padded:
            g = F.pad(g, (before, after, before, after))
        y = private_ops.packed_conv2d(g, self.back, None, 0, 1) if self.packed else F.conv2d(g, self.back)
        out = depth_to_space(y, self.stride) if self.stride > 1 else y
        return out[..., : self.size_in, : self.size_in]


def _sequence(model: nn.Module) -> list[nn.Module] | str:
    """The model's layers in order, or the reason it has no explicit gradient."""
    layers_fn = getattr(model, "sequential_layers", None)
    layers = layers_fn() if layers_fn is not None else None
    if layers is None or not hasattr(model, "feature_energy_and_gradient"):
        backbone = type(getattr(model, "backbone", model)).__name__
        return f"backbone {backbone} is not a plain layer sequence"
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if (
                layer.groups != 1
                or layer.dilation != (1, 1)
                or layer.padding_mode != "zeros"
                or isinstance(layer.padding, str)
                or len({*layer.kernel_size}) != 1
                or len({*layer.stride}) != 1
                or len({*layer.padding}) != 1
            ):
                return "a convolution with groups, dilation, non-zero padding mode or a non-square geometry"
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return "a Flatten other than Flatten(1, -1)"
        elif not isinstance(layer, (nn.Linear, nn.Identity, *_ACTIVATIONS)):
            return f"layer {type(layer).__name__} has no explicit backward here"
    return layers


def explicit_support(model: nn.Module, device: torch.device | str) -> str | None:
    """None if `ExplicitGradient` can run this model on this device, else the reason it cannot."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"explicit gradients are a CPU path (device {device.type}); autograd is used"
    layers = _sequence(model)
    return layers if isinstance(layers, str) else None


class ExplicitGradient:
    """E(x) and ∇ₓE(x) of a supported `EnergyModel`, for one input shape, dtype and layout.

    Args:
        model: an EnergyModel whose backbone has ``sequential_layers()`` (see `explicit_support`).
        shape: (N, C, H, W) of the chains.
        dtype: dtype of the network evaluation (torch.float32 or torch.bfloat16); the chain stays fp32.
        channels_last: run convolutions in NHWC.
    """

    def __init__(self, model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> None:
        layers = _sequence(model)
        if isinstance(layers, str):
            raise ValueError(layers)
        device = next(model.parameters()).device
        self.dtype = dtype
        self.channels_last = channels_last and len(shape) == 4
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # oneDNN packed weights where the probe found them working for this dtype; plain F.conv2d otherwise
        found = probe(device)
        packed = found.ok("packed_conv_bf16" if dtype == torch.bfloat16 else "packed_conv_fp32") and dtype in (
            torch.float32,
            torch.bfloat16,
        )
        fused = found.ok("activation_backward")
        self.packed = packed
        self.steps: list[tuple[str, object]] = []
        current = tuple(shape)
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
                size_in = current[-1]
                size_out = (size_in + 2 * p - k) // s + 1
                weight = layer.weight.detach().to(dtype=dtype, memory_format=fmt)
                back, before, after = subpixel_weight(layer.weight.detach(), s, p, size_in, size_out)
                back = back.to(dtype=dtype, memory_format=fmt)
                bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
                padded_out = size_out + before + after
                if packed:
                    weight = private_ops.pack_conv_weight(weight, p, s, current)
                    back = private_ops.pack_conv_weight(
                        back, 0, 1, (current[0], layer.out_channels, padded_out, padded_out)
                    )
                conv = _Conv(weight, bias, s, p, back, (before, after), size_in, packed)
                self.steps.append(("conv", conv))
                current = (current[0], layer.out_channels, size_out, size_out)
            elif isinstance(layer, nn.Linear):
                w = layer.weight.detach().to(dtype)
                b = layer.bias.detach().to(dtype) if layer.bias is not None else None
                self.steps.append(("linear", (w, b)))
                current = (current[0], layer.out_features)
            elif isinstance(layer, nn.Flatten):
                self.steps.append(("flatten", current))
                current = (current[0], math.prod(current[1:]))
            elif isinstance(layer, nn.Identity):
                continue
            else:
                fused_fn, public_fn = private_ops.ACTIVATION_BACKWARD[_ACTIVATIONS[type(layer)]]
                slope = float(getattr(layer, "negative_slope", 0.0))
                self.steps.append(("act", (layer, fused_fn if fused else public_fn, slope)))
        # the energy heads on the features, and their gradient, are the model's own (jemlab.energy's convention)
        # (a weak reference: the plan cache is keyed weakly by the model, so the plan must not keep it alive)
        self._model = weakref.ref(model)
        self._buffers = threading.local()  # per-thread padded gradient buffers (see _Conv.padded_input)
        # activation step index → the convolution before it, when its backward writes into that one's padded input
        self._pad_into = {
            i: self.steps[i - 1][1]
            for i, (kind, _) in enumerate(self.steps)
            if kind == "act" and i > 0 and self.steps[i - 1][0] == "conv" and self.steps[i - 1][1].pads_input
        }

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E(x) as fp32 (N,), ∇ₓE(x) as fp32 in x's layout); with labels, the joint energy E(x, y) = −f(x)[y]."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.to(self.dtype)
        if h.dim() == 4:
            h = h.contiguous(memory_format=fmt)
        saved: list[torch.Tensor] = []
        with torch.no_grad():
            for kind, item in self.steps:
                if kind == "conv":
                    h = item.forward(h)
                elif kind == "linear":
                    h = F.linear(h, *item)
                elif kind == "flatten":
                    h = h.flatten(1)
                else:
                    saved.append(h)
                    h = item[0](h)
            features = h.float()
            energy, g = self._model().feature_energy_and_gradient(features, labels)
            g = g.to(self.dtype)
            padded = False  # g is already the zero-padded input of the convolution that comes next
            for i in range(len(self.steps) - 1, -1, -1):
                kind, item = self.steps[i]
                if kind == "conv":
                    g = item.backward(g, padded)
                    padded = False
                elif kind == "linear":
                    g = g @ item[0]
                elif kind == "flatten":
                    g = g.reshape(item).contiguous(memory_format=fmt) if len(item) == 4 else g.reshape(item)
                else:
                    pre = saved.pop()
                    _, backward, slope = item
                    conv = self._pad_into.get(i)
                    if conv is not None:
                        buffer, interior = conv.padded_input(self._buffers, pre)
                        backward(g, pre, slope, interior)
                        g, padded = buffer, True
                    else:
                        g = backward(g, pre, slope, torch.empty_like(pre))
            grad = g.to(torch.float32).reshape(x.shape)
            if x.dim() == 4 and _is_nhwc(x):
                return energy, grad.contiguous(memory_format=torch.channels_last)
        return energy, grad.contiguous()


# plans are cached per model (weakly) and rebuilt when a parameter changes in place (optimiser step)
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, ExplicitGradient]] = weakref.WeakKeyDictionary()


def explicit_gradient(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool
) -> ExplicitGradient:
    """The (cached) plan for this model, shape, dtype and layout; rebuilt after any in-place parameter update."""
    device = next(model.parameters()).device
    versions = private_ops.parameter_versions(model) if probe(device).ok("version_counter") else None
    if versions is None:  # no way to tell whether the weights changed: a fresh plan every chain
        return ExplicitGradient(model, shape, dtype, channels_last)
    key = (tuple(shape), dtype, channels_last, versions)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = ExplicitGradient(model, shape, dtype, channels_last)
    _PLANS[model] = (key, plan)
    return plan
