"""EGC's noise-conditional energy network (Guo et al., ICCV 2023): a small UNet whose output is a logit map.

The network f_θ(x_t, t) maps a noisy image to a per-pixel logit map m ∈ R^{K×H×W} (K = number of classes). Two
readings of that map give the energy (``energy`` option):

- ``"map"`` (the official code): E(x_t, t) = −Σ_pixels logsumexp_k m[k, i, j], a sum of per-pixel JEM energies;
- ``"pooled"``: E(x_t, t) = −logsumexp_y f(x_t, t)[y] of the pooled class logits, the JEM energy of the
  classifier itself.

Classification pools the map to C logits (``pool``: spatial mean, the official attention pooling whose query
is the mean token, or the spatial mean of the per-pixel log-softmax, which leaves the map energy's per-pixel level
to the denoiser). The score of p_t is −∇ₓE, so the noise estimate is ε̂ = √(1 − ᾱ_t) ∇ₓE(x_t, t) (`eps`).

Optionally (``label_conditioning``) the class y enters through an embedding added to the time embedding, as the
official code's conditional branch does; index C is the "no label" token, used for classification, for the
unconditional energy, and for the 10% of training labels that are dropped.

The model knows no noise schedule: callers pass integer timesteps and, for `eps`, the noise level √(1 − ᾱ_t).

``output="epsilon"`` builds the control of the EGC comparison instead: the same UNet trunk (time and label
embeddings, residual blocks, attention, patches) whose output head, of the same width, emits ε̂(x_t, t[, y]) with
the image's channels directly, as a plain ε-prediction diffusion model (Ho et al., 2020) does. It has no logit map,
no energy and no classifier: ε̂ is read off the output, not differentiated out of an energy, so training needs no
double back-propagation. `logits`, `energy` and the other classifier readings raise `NoClassifierError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jemlab.energy import joint_energy, marginal_energy
from jemlab.errors import ConfigError, JemlabError

#: What the output head emits: the per-pixel logit map (EGC's energy network) or ε̂ itself (the control).
OUTPUTS = ("logits", "epsilon")
#: How the logit map becomes the energy: summed per-pixel logsumexp (official) or the pooled logits' logsumexp.
ENERGIES = ("map", "pooled")
#: How the energy's input gradient becomes ε̂: scaled by the noise level (as published) or read as ε̂ directly.
ENERGY_SCALES = ("none", "sigma")
#: An energy added to the network's: none (as published) or the standard normal's ½‖x_t‖².
ENERGY_BASES = ("none", "gaussian")
#: How the logit map becomes class logits.
POOLS = ("mean", "attention", "mean_log_softmax")
#: What the classifier reads: the logit map (as published) or a convolutional head on the trunk's last features.
CLASSIFIERS = ("map", "head")


class NoClassifierError(JemlabError):
    """A classifier or energy reading was asked of the ε-prediction control, which has neither."""


def _groups(channels: int) -> int:
    """GroupNorm groups: as many as possible (≤ 32) with at least 4 channels each."""
    for groups in (32, 16, 8, 4, 2, 1):
        if channels % groups == 0 and channels // groups >= 4:
            return groups
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al., 2017; Ho et al., 2020).

    Args:
        t: (N,) timesteps.
        dim: embedding size.

    Returns:
        (N, dim) embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reductions over hundreds of pixels in float32 (or float64) even when the network ran in bfloat16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, FiLM by the time embedding (scale and shift), GroupNorm → SiLU → dropout → conv,
    plus a skip; the last convolution starts at zero so every block starts as the identity."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (N, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, residual, output projection starting at zero.

    Written with plain matrix products: the training loss differentiates the energy twice, and the fused attention
    kernels do not all support a second derivative.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)  # (N, C, HW) each
        weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / math.sqrt(c), dim=-1)  # (N, HW, HW)
        out = torch.einsum("nij,ncj->nci", weights, v).reshape(n, c, h, w)
        return x + self.proj(out)


class AttentionPool(nn.Module):
    """Pool a (N, K, H, W) map to (N, C) logits: the mean position attends to all positions (the official code's
    pooling, after CLIP), one head, then a linear map to the classes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, num_classes)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        tokens = m.flatten(2).transpose(1, 2)  # (N, HW, K)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)  # (N, 1 + HW, K)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        weights = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)  # (N, 1, 1 + HW)
        return self.out((weights @ v)[:, 0])  # (N, C)


class ClassifierHead(nn.Module):
    """Class logits from the trunk's last features (N, ch, h, w): two 3×3 convolutions at that resolution (the
    second widening to 2·ch), one strided to half of it (4·ch), each after GroupNorm → SiLU, then GroupNorm → SiLU,
    the spatial mean and a linear map to the classes. About a small CNN's capacity (~0.3M weights at width 32), so
    the classifier does not have to be trained into the denoiser's features."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        wide, wider = 2 * channels, 4 * channels
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, wide, 3, padding=1),
            nn.GroupNorm(_groups(wide), wide),
            nn.SiLU(),
            nn.Conv2d(wide, wider, 3, stride=2, padding=1),
            nn.GroupNorm(_groups(wider), wider),
            nn.SiLU(),
            nn.Conv2d(wider, wider, 3, padding=1),
            nn.GroupNorm(_groups(wider), wider),
            nn.SiLU(),
        )
        self.out = nn.Linear(wider, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(h).mean(dim=(2, 3)))


def _check_options(
    image_size: int,
    width: int,
    channel_mult: list[int],
    num_res_blocks: int,
    energy: str,
    pool: str,
    patch: int,
    output: str,
    classifier: str,
    energy_scale: str,
    energy_base: str,
) -> None:
    """One-line errors (ConfigError) for option values `EGCUNet` cannot build, each naming the fix."""
    for name, value, choices in (
        ("output", output, OUTPUTS), ("energy_scale", energy_scale, ENERGY_SCALES),
        ("energy_base", energy_base, ENERGY_BASES), ("energy", energy, ENERGIES), ("pool", pool, POOLS),
        ("classifier", classifier, CLASSIFIERS),
    ):  # fmt: skip
        if value not in choices:
            listed = ", ".join(choices) if len(choices) > 2 else " or ".join(choices)
            raise ConfigError(f"egc_unet {name} must be {listed}, got '{value}'")
    if classifier == "head" and energy != "map":
        raise ConfigError("egc_unet classifier=head reads class logits from its head, not the map: use energy=map")
    if pool == "mean_log_softmax" and energy != "map":
        raise ConfigError("egc_unet pool=mean_log_softmax splits the map's level from its classes: use energy=map")
    if not channel_mult or min(channel_mult) < 1 or width < 4 or num_res_blocks < 1:
        raise ConfigError("egc_unet needs width >= 4, num_res_blocks >= 1 and channel multipliers >= 1")
    multiple = max(patch, 1) * 2 ** (len(channel_mult) - 1)
    if patch < 1 or image_size % multiple:
        fit = max(multiple, round(image_size / multiple) * multiple)
        raise ConfigError(
            f"egc_unet needs an image size divisible by patch {patch} × 2^{len(channel_mult) - 1} (levels) = "
            f"{multiple}, got {image_size}; resize the images with data.image_size={fit}, or set model.patch / "
            f"model.channel_mult to fit"
        )


class EGCUNet(nn.Module):
    """The EGC energy network: f_θ(x_t, t[, y]) → logit map, energy, class logits, and ε̂ by differentiation.

    Args:
        in_channels: image channels (1 for MNIST-like, 3 for CIFAR).
        image_size: height = width of the images (28 or 32).
        num_classes: C, the number of classes (also the channels of the logit map).
        width: base channel count.
        channel_mult: channel multiplier per resolution; a level halves the resolution before the next one.
        num_res_blocks: residual blocks per resolution on the way down (one more on the way up).
        attention: add self-attention at these downsampling factors (e.g. [2] = at half resolution); the middle
            block always has one when the list is non-empty.
        dropout: dropout inside the residual blocks.
        energy: ``"map"`` (official: −Σ_pixels logsumexp of the map) or ``"pooled"`` (−logsumexp of the logits).
        pool: ``"mean"`` (spatial mean of the map), ``"attention"`` (official attention pooling) or
            ``"mean_log_softmax"`` (spatial mean of log_softmax over the classes at each pixel). A pixel's map
            m = log_softmax(m) + logsumexp(m) splits into a class distribution and a level; the ``map`` energy reads
            only the level, and this pooling only the distribution, so the cross-entropy has no direct pull on the
            energy (with ``"mean"`` it raises m[y] and hence the level, and the energy's input gradient becomes
            the classifier's). Needs ``energy="map"``.
        label_conditioning: let the energy depend on a class label (index C = no label).
        patch: fold patch×patch pixels into channels before the first convolution and unfold the logit map at
            the end (pixel unshuffle/shuffle), so the UNet runs at 1/patch of the resolution: about patch² times
            cheaper, which is what makes a CPU run practical; the logit map stays per pixel.
        output: ``"logits"`` (EGC: the per-pixel logit map, read as an energy and a classifier) or ``"epsilon"``
            (the control: the last convolution emits ε̂ with ``in_channels`` channels instead of ``num_classes``;
            ``energy`` and ``pool`` are then not used, and there is no attention pooling to build).
        energy_scale: how the energy's input gradient becomes the noise estimate. ``"none"`` (EGC as published):
            ε̂ = √(1 − ᾱ_t) ∇ₓE, so at small t the gradient must be ~1/√(1 − ᾱ_t) (up to ~100×) larger than at
            large t. ``"sigma"``: the energy is the network's g divided by the noise level, E(x_t, t) = g(x_t, t) /
            √(1 − ᾱ_t), so ε̂ = ∇ₓg at one scale for every t; classification reads the same logit map, and at a
            fixed t (t = 0 for evaluation) the energy is g up to a constant factor, the same ordering.
        energy_base: ``"gaussian"`` adds ½‖x_t‖² to the energy, the energy of the standard normal that x_t becomes
            at t = T, so that the network models the density relative to it: ε̂ gains the term √(1 − ᾱ_t)·x_t,
            which is already the exact noise at t = T (and the best linear guess for unit-variance data at every t),
            and the network learns the rest. The term is the same for every class, so p(y | x_t, t) and the logit
            map are unchanged; `energy_t` and `energy` return the network's part (the base is added to ε̂ only).
            ``"none"`` (EGC as published): no base.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention: Sequence[int] = (),
        dropout: float = 0.0,
        energy: str = "map",
        pool: str = "mean",
        label_conditioning: bool = True,
        patch: int = 1,
        output: str = "logits",
        energy_scale: str | None = "none",
        energy_base: str | None = "none",
        classifier: str = "map",
    ) -> None:
        super().__init__()
        energy_scale = energy_scale or "none"  # `--set model.energy_scale=none` arrives as None
        energy_base = energy_base or "none"
        channel_mult = [int(m) for m in channel_mult]
        _check_options(
            image_size, width, channel_mult, num_res_blocks, energy, pool, patch, output, classifier, energy_scale,
            energy_base,
        )  # fmt: skip
        self.num_classes = num_classes
        self.energy_form = energy
        self.output = output
        self.energy_scale = energy_scale
        self.energy_base = energy_base
        # The control has no classifier: the evaluation reads this to skip (or refuse) the parts that need one.
        self.has_classifier = output == "logits"
        self.width = width
        attention = {int(a) for a in attention}
        emb_dim = 4 * width
        self.time_embed = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if label_conditioning else None
        if self.label_embed is not None:
            nn.init.zeros_(self.label_embed.weight)  # labels start without effect; the model learns to use them

        # Down path: every module's output is kept as a skip for the up path.
        self.patch = patch
        self.conv_in = nn.Conv2d(in_channels * patch * patch, width, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, factor = [width], width, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, width * mult, emb_dim, dropout)])
                ch = width * mult
                if factor in attention:
                    block.append(SelfAttention(ch))
                self.down.append(block)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                factor *= 2
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout)])
        if attention:
            self.middle.append(SelfAttention(ch))
        self.middle.append(ResBlock(ch, ch, emb_dim, dropout))

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip; upsample at the end of a level.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), width * mult, emb_dim, dropout)])
                ch = width * mult
                if factor in attention:
                    block.append(SelfAttention(ch))
                if level > 0 and i == num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(ch, ch, 3, padding=1))
                    factor //= 2
                self.up.append(block)
        out_channels = num_classes if output == "logits" else in_channels  # K logits, or ε̂ with the image's channels
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch),
            nn.SiLU(),
            _zero(nn.Conv2d(ch, out_channels * patch * patch, 3, padding=1)),
            nn.PixelShuffle(patch),  # (N, K·p², H/p, W/p) → (N, K, H, W)
        )
        self.pool = AttentionPool(num_classes, num_classes) if pool == "attention" and self.has_classifier else None
        head = classifier == "head" and self.has_classifier
        self.classifier_head = ClassifierHead(ch, num_classes) if head else None
        self.pool_log_softmax = pool == "mean_log_softmax"

    # --- the network -------------------------------------------------------------------------------------------

    def _embedding(self, t: torch.Tensor, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(n)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.width).to(dtype))  # (N, 4·width)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((n,), self.num_classes, device=device, dtype=torch.long)
            emb = emb + self.label_embed(y.to(device))
        return emb

    def _run(self, block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def logit_map(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """The per-pixel logit map m(x_t, t[, y]).

        Args:
            x: (N, C_in, H, W) noisy images.
            t: (N,) integer timesteps (or one int for all).
            y: (N,) labels for the conditional energy, index C for none; None = no label.

        Returns:
            (N, num_classes, H, W).
        """
        self._require_classifier("a logit map")
        return self._network(x, t, y)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """The control's noise estimate ε̂(x_t, t[, y]), read off the output head (``output="epsilon"`` only).

        Args:
            x: (N, C_in, H, W) noisy images.
            t: (N,) integer timesteps (or one int for all).
            y: (N,) labels for the label-conditioned network, index C for none; None = no label.

        Returns:
            ε̂, shaped like x (in the network's dtype; under autocast possibly bfloat16).
        """
        if self.has_classifier:
            raise ConfigError("predict_eps reads the ε head of model.output=epsilon; this network emits a logit map")
        return self._network(x, t, y)

    def _require_classifier(self, what: str) -> None:
        if not self.has_classifier:
            raise NoClassifierError(
                f"this EGC UNet predicts ε directly (model.output=epsilon, the plain diffusion control): it has no "
                f"energy or classifier, so {what} is not defined; evaluate its samples (jemlab eval --parts samples)"
            )

    def _network(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None) -> torch.Tensor:
        """Trunk and output head: (N, num_classes, H, W) logits, or (N, C_in, H, W) ε̂ for the control."""
        return self.out(self._trunk(x, t, y))

    def _trunk(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None) -> torch.Tensor:
        """The UNet up to its output head: features (N, ch, H/p, W/p) of the last up-path block."""
        emb = self._embedding(t, y, len(x), x.device)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)  # (N, width, H/p, W/p)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.middle, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        return h

    def map_and_logits(self, x: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """The label-free logit map m(x_t, t) and the class logits f(x_t, t) from one pass of the trunk.

        Args:
            x: (N, C_in, H, W) noisy images.
            t: (N,) integer timesteps (or one int for all).

        Returns:
            (map (N, num_classes, H, W), logits (N, num_classes)).
        """
        self._require_classifier("class logits")
        h = self._trunk(x, t, None)
        m = self.out(h)
        return m, (self.classifier_head(h) if self.classifier_head is not None else self.pool_logits(m))

    def pool_logits(self, m: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) from a logit map (N, C, H, W) (``classifier="map"``; the head reads the trunk)."""
        self._require_classifier("class logits")
        if self.classifier_head is not None:
            raise ConfigError("this EGC UNet classifies with its own head (classifier=head): read map_and_logits")
        if self.pool is not None:
            return self.pool(m)
        if self.pool_log_softmax:
            return F.log_softmax(_at_least_fp32(m), dim=1).mean(dim=(2, 3))
        return m.mean(dim=(2, 3))

    def energy_from_map(self, m: torch.Tensor) -> torch.Tensor:
        """E (N,) from a logit map: −Σ_pixels logsumexp (``map``) or −logsumexp of the pooled logits."""
        self._require_classifier("an energy")
        if self.energy_form == "map":
            return -torch.logsumexp(_at_least_fp32(m), dim=1).sum(dim=(1, 2))
        return marginal_energy(_at_least_fp32(self.pool_logits(m)))

    # --- noise-conditional API ---------------------------------------------------------------------------------

    def logits_t(self, x: torch.Tensor, t: torch.Tensor | int, trunk_grad: float = 1.0) -> torch.Tensor:
        """Class logits f(x_t, t), shape (N, C) (no label given).

        `trunk_grad` is the share of the gradient through the logits that reaches the trunk (training): 1 keeps all
        of it, 0 runs the trunk without a graph so that only the classifier's own layers (the output head, or
        `ClassifierHead`) learn from the logits. The logits' values do not depend on it.
        """
        self._require_classifier("class logits")
        if trunk_grad <= 0:
            with torch.no_grad():
                h = self._trunk(x, t, None)
        else:
            h = self._trunk(x, t, None)
            if trunk_grad < 1:
                h = torch.lerp(h.detach(), h, trunk_grad)  # the value of h; trunk_grad × its gradient
        return self.classifier_head(h) if self.classifier_head is not None else self.pool_logits(self.out(h))

    def energy_t(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Energy E(x_t, t[, y]), shape (N,)."""
        return self.energy_from_map(self.logit_map(x, t, y))

    def eps(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        sigma: torch.Tensor,
        y: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor:
        """Noise estimate ε̂ = √(1 − ᾱ_t) ∇ₓE(x_t, t[, y]) by differentiating the energy; for the control
        (``output="epsilon"``) the output head's ε̂(x_t, t[, y]) itself, and `sigma` is not used.

        Args:
            x: (N, C_in, H, W) noisy images.
            t: (N,) timesteps.
            sigma: √(1 − ᾱ_t), broadcastable to x (e.g. (N, 1, 1, 1)).
            y: optional labels for the conditional energy.
            create_graph: keep the graph of the gradient (training: the loss back-propagates through ∇ₓE).

        Returns:
            ε̂, shaped like x (detached unless create_graph).
        """
        if not self.has_classifier:  # the control: one forward pass, no input gradient
            if create_graph:
                return self.predict_eps(x, t, y)
            with torch.no_grad():
                return self.predict_eps(x, t, y)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            energy = self.energy_t(x_in, t, y)
            (grad,) = torch.autograd.grad(energy.sum(), x_in, create_graph=create_graph)
        eps = self.noise_from_gradient(grad, sigma, x)
        return eps if create_graph else eps.detach()

    def noise_from_gradient(self, grad: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ε̂ at the noisy images `x` from the input gradient of the network's energy: √(1 − ᾱ_t)·∇ₓE, or ∇ₓg
        itself with ``energy_scale="sigma"``, plus √(1 − ᾱ_t)·x with ``energy_base="gaussian"`` (see the class
        docstring). The training loss and the samplers both come here."""
        eps = grad if self.energy_scale == "sigma" else sigma * grad
        return eps + sigma * x.to(eps.dtype) if self.energy_base == "gaussian" else eps

    def guidance_weight(self, sigma: torch.Tensor) -> torch.Tensor | float:
        """Per-image factor on log p(y | x_t, t) in a guided objective whose input gradient `noise_from_gradient`
        turns into ε̂ − s·√(1 − ᾱ_t)·∇ₓ log p(y | x_t, t) (classifier guidance in ε form) at either energy scale:
        1 when ε̂ = σ·∇ₓE, σ itself (one value per image) when ε̂ = ∇ₓg."""
        return sigma.reshape(-1) if self.energy_scale == "sigma" else 1.0

    def energy_to_t0_scale(self, sigma0: float) -> float:
        """How many times the true t = 0 energy E(x, 0) is larger than `energy(x)`: 1/σ_0 with
        ``energy_scale="sigma"`` (energy(x) returns g, and E = g/σ_0), else 1. Langevin dynamics on E(x, 0) reads
        it to size its step on `energy(x)`."""
        return 1.0 / sigma0 if self.energy_scale == "sigma" else 1.0

    # --- the t = 0 reading used by evaluation (same interface as EnergyModel) ------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at t = 0 (classification in EGC), shape (N, C)."""
        return self.logits_t(x, 0)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x, 0), shape (N,)."""
        return self.energy_t(x, 0)

    def logits_and_energy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and E(x, 0) (N,) from one forward pass."""
        m, logits = self.map_and_logits(x, 0)
        return logits, self.energy_from_map(m)

    def joint_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E(x, y) = −f(x, 0)[y], shape (N,) (the JEM reading of the t = 0 classifier)."""
        return joint_energy(self.logits(x), y)
