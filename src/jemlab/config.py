"""Typed configuration: defaults → preset → ``--set key=value`` overrides → validation → saved as JSON.

A preset only states what differs from the defaults (as in score_sde's configs). Unknown keys are errors that list
the valid ones; every value is converted to its field's type and range-checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jemlab.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # explicit folder with the dataset's files (searched first)
    val_size: int | None = None  # held-out validation images; None = min(5000, a tenth of the training set)
    limit: int | None = None  # use only this many training images (quick runs, tests)
    download: bool = True  # fetch from the official URLs if the files are nowhere on disk
    augment: str = "none"  # training images for log p(y|x): none, crop (reflect-pad 4, random crop) or crop_flip
    augment_px: str = "same"  # images for log p(x): same (as the CE branch) or none (unaugmented; SADA-JEM)


@dataclass
class ModelConfig:
    name: str = "cnn"  # backbone: cnn, course_cnn, mlp, wide_resnet
    energy_head: str = "logsumexp"  # logsumexp (JEM) or separate (scalar head, SPEC S2)
    # Backbone keyword arguments, set as `model.<arg>=value` (e.g. model.width=32); checked against the backbone.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    steps: int = 20  # K, SGLD steps per training iteration
    step_size: float = 1.0  # α, multiplier of ∇E ("cold" SGLD: not tied to the noise)
    noise: float = 0.01  # σ, std of the Gaussian noise per step
    grad_clamp: float | None = None  # clip ∇E element-wise to ±c (proximal SGLD; course: 0.03)
    noise_first: bool = False  # add noise before the gradient step (course order)
    persistent: bool = True  # draw chains from a replay buffer; False = fresh noise every iteration (SPEC S3)
    buffer_size: int = 10000
    buffer_mode: str = "fixed"  # fixed (JEM: write back into the drawn slots) or queue (course: push in front)
    reinit_prob: float = 0.05  # chance that a drawn chain restarts from the initialiser
    class_conditional: bool = False  # partition the buffer by class (needed for p(x|y) training)
    init: str = "uniform"  # chain initialiser: uniform (JEM) or gaussian (JEM++: per-class Gaussians of the data)
    init_covariance: str = "diag"  # gaussian init: diag, lowrank or full (full stores K·D² floats)
    init_rank: int = 32  # gaussian init with lowrank covariance: principal directions kept per class
    init_max_per_class: int | None = None  # gaussian init: fit on at most this many images per class
    batch_size: int | None = None  # negatives per iteration; None = the training batch size
    # dtype of the chains' network evaluation: auto (bf16 where the device runs it natively, i.e. a CPU with
    # AVX512_BF16/AMX or a bf16-capable GPU; fp32 elsewhere: jemlab.accel.choices), fp32, bf16, or fp16 (GPU)
    precision: str = "auto"
    impl: str = "reference"  # reference (the plain sgld function) or fast (samplers/fast.py: same math, faster)
    chain_groups: int = 1  # impl=fast on CPU: step this many groups of chains concurrently, one thread each; 0 = one
    # per torch thread. Needs per-sample energies (no BatchNorm in training mode).
    compile: bool = False  # impl=fast: torch.compile the energy-gradient step (falls back to eager if it fails)
    cuda_graph: bool = False  # impl=fast on a GPU: replay the step as a CUDA graph (no per-step launch overhead)
    # impl=fast: how ∇ₓE is computed. auto = the hand-written backward of accel/explicit.py where the model
    # allows it (plain layer sequences on a CPU; not with compile/cuda_graph), else autograd; explicit = insist.
    gradient: str = "auto"
    pyld_steps: int = 0  # JEM++ PYLD: first-layer-only inner steps after each full SGLD step (0 = plain SGLD)
    pyld_step_size: float = 0.2  # PYLD inner step size (JEM++ CIFAR-10: 0.2)
    pyld_clamp: float | None = 1.0  # PYLD: clip the inner gradient element-wise to ±c (JEM++: 1)


@dataclass
class ObjectiveConfig:
    name: str = "jem"  # jem (CE + contrastive divergence, SGLD negatives) or egc (diffusion; see the egc section)
    ce: float = 1.0  # weight of log p(y|x)
    px: float = 1.0  # weight of log p(x) (contrastive divergence); 0 gives a plain softmax classifier
    pxy: float = 0.0  # weight of log p(x|y)
    energy_l2: float = 0.0  # weight of (E_data² + E_model²).mean(); 0.1 stabilises (SPEC S2)
    input_noise: float = 0.03  # std of Gaussian noise added to training inputs (JEM: 0.03; 0.1 is more stable)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam, adamw or sgd
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear warm-up from 0 (JEM: 1,000 iterations)
    schedule: str = "constant"  # constant, step (× gamma every `step_epochs`), multistep (at `milestones`), cosine
    gamma: float = 0.1
    step_epochs: int = 1
    milestones: tuple[int, ...] = ()
    grad_clip: float | None = None  # clip the global gradient norm


@dataclass
class TrainConfig:
    epochs: int = 100
    minutes: float | None = None  # wall-clock budget; training stops cleanly and still saves
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int | None = None  # torch CPU threads; None = torch's default
    channels_last: bool = False  # NHWC memory layout (faster convolutions on CPU with oneDNN)
    log_every: int = 100  # iterations between log lines
    sample_every: int = 1  # epochs between sample grids
    checkpoint_every: int = 1  # epochs between checkpoints (plus one at the end)
    checkpoint_minutes: float = 10.0  # also checkpoint after this many minutes without one
    keep_checkpoints: int = 3
    max_abs_energy: float = 1e5  # divergence beyond this |energy| (recovery.* says what happens then)
    tensorboard: bool = True  # write TensorBoard events when the tensorboard package is installed
    progress: bool = True  # progress bar on a terminal
    # training loss forward/backward: auto (bf16 autocast on a bf16-capable GPU, fp32 on a CPU), fp32, bf16
    # (autocast) or fp16 (GPU: autocast + GradScaler)
    precision: str = "auto"


@dataclass
class RecoveryConfig:
    """Divergence recovery (docs/reliability.md): roll back to the last healthy state, change what follows, go on."""

    enabled: bool = True  # false: stop with a DivergenceError at the first divergence (what other JEM code does)
    max_retries: int = 5  # recoveries per run before giving up with an error (the healthy state is saved)
    snapshot_every: int = 50  # iterations between in-memory healthy snapshots (also one at every checkpoint)
    lr_factor: float = 0.5  # optim.lr × this at each recovery
    sgld_steps_factor: float = 1.5  # sampler.steps × this at each recovery (longer chains: better negatives) ...
    max_sgld_steps: int = 100  # ... capped here
    sgld_step_size_factor: float = 1.0  # sampler.step_size × this at each recovery (1: unchanged)
    energy_l2_factor: float = 2.0  # objective.energy_l2 × this at each recovery ...
    min_energy_l2: float = 0.01  # ... and at least this (0.1 is the course code's value)
    reseed_chains: bool = True  # new seed for the buffer draws and the Langevin noise
    buffer_reset_fraction: float = 0.25  # fraction of replay-buffer chains restarted from the initialiser
    # Detectors (absolute bound: train.max_abs_energy). Relative ones fire at factor × max(running average, floor).
    energy_gap_factor: float = 100.0  # |E(x_data) − E(x_model)|
    energy_gap_floor: float = 1.0
    sgld_grad_factor: float = 1000.0  # SGLD gradient norm |∇ₓE|
    sgld_grad_floor: float = 1.0
    warmup_steps: int = 20  # healthy iterations before the relative detectors are armed
    collapse_patience: int = 20  # iterations in a row of a flat energy surface that count as a collapse
    # Classifier collapse: after the classifier has learned something, `classifier_patience` iterations in a row at
    # chance level (cross-entropy ~ log C, accuracy ~ 1/C) count as a divergence; 0 turns the check off.
    classifier_patience: int = 20
    # Slow drift of the data-sample energy gap, a warning only (no rollback): a logged |E(x_data) − E(x_model)|
    # above this is reported in the log and metrics.jsonl, again each time it doubles; 0 turns it off. Healthy
    # default/jempp runs stay below 0.3; two runs whose replay buffer collapsed reached 22–25 (docs/reliability.md).
    gap_warning: float = 5.0


@dataclass
class EGCConfig:
    """EGC (Guo et al., ICCV 2023; SPEC S5), read when objective.name=egc: noise schedule, loss, EMA, sampler."""

    schedule: str = "linear"  # β schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)
    timesteps: int = 1000  # T diffusion steps
    gamma: float = 0.005  # weight of CE(f(x_t, t), y)·√ᾱ_t on noisy images (EGC: 0.001–0.005)
    gamma_clean: float = 0.005  # weight of CE(f(x_0, 0), y) on clean images
    label_smoothing: float = 0.2  # of both CE terms
    label_dropout: float = 0.1  # fraction of labels replaced by "no label" in the denoising term
    ema: float = 0.9999  # decay of the EMA weights used for evaluation and sampling
    ema_warmup: bool = True  # decay min(ema, (1 + n)/(10 + n)) after n updates, so short runs get a useful EMA
    sampler: str = "ddim"  # ddim (deterministic for eta=0) or ddpm (ancestral)
    sample_steps: int = 100  # sampler steps (a subsequence of the T timesteps)
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic, 1 = DDPM-like)
    guidance: float = 1.0  # scale of the model's own classifier gradient for class-conditional samples
    clip_x0: bool = True  # clip the predicted clean image to [−1, 1] at each sampler step
    precision: str = "auto"  # auto (as train.precision), fp32 or bf16: autocast of the training forward passes


@dataclass
class Config:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    egc: EGCConfig = field(default_factory=EGCConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- presets: only what differs from the defaults -------------------------------------------------------------

# The CPU presets' network and optimiser (default, softmax, jempp), stated once.
_CPU_CNN: dict[str, Any] = {
    "model.name": "cnn",
    "model.options": {"width": 16, "features": 256, "act": "swish"},
    "objective.input_noise": 0.03,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 200,
    "train.batch_size": 128,
    "train.channels_last": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Tuned for Fashion-MNIST/MNIST on a 2-core CPU (runs and numbers in docs/tuning.md): a small Swish CNN;
    # persistent SGLD with the paper's K = 20, α = 1, σ = 0.01, evaluated in an NHWC layout (and in bfloat16 where
    # the CPU runs it natively: sampler.precision=auto); chains
    # (re)started from per-class diagonal Gaussians of the training data (JEM++'s informative initialisation:
    # from uniform noise, restarted chains stop reaching the data after ~6 epochs and the buffer fills with
    # noise); a 5,000-image buffer so that chains mature within minutes; 128 data images and 64 chains per
    # iteration; log p(x) weighted 0.3 (at weight 1 the classifier learns ~3x slower per iteration); weak energy L2.
    "default": {
        **_CPU_CNN,
        "sampler.steps": 20,
        "sampler.init": "gaussian",
        "sampler.buffer_size": 5000,
        "sampler.batch_size": 64,
        "sampler.impl": "fast",  # same chain as the reference sampler; explicit input gradient (docs/sampling.md)
        "objective.px": 0.3,
        "objective.energy_l2": 0.01,
    },
    # The same network and data schedule as a plain softmax classifier: the JEM paper's baseline (no p(x) term).
    "softmax": {
        **_CPU_CNN,
        "objective.px": 0.0,
    },
    # SPEC S2, the course exercise: two-headed CNN, 60 clipped SGLD steps of size 10, queue buffer of 8,192.
    "course": {
        "model.name": "course_cnn",
        "model.energy_head": "separate",
        "model.options": {},
        "sampler.steps": 60,
        "sampler.step_size": 10.0,
        "sampler.noise": 0.005,
        "sampler.grad_clamp": 0.03,
        "sampler.noise_first": True,
        "sampler.buffer_size": 8192,
        "sampler.buffer_mode": "queue",
        # The same chain, executed faster (docs/sampling.md): NHWC layout, bf16 where native (precision auto),
        # the hand-written input gradient of accel/explicit.py (chain groups where it does not apply). Set
        # sampler.impl=reference sampler.precision=fp32 train.channels_last=false for the original.
        "sampler.impl": "fast",
        "sampler.chain_groups": 0,
        "train.channels_last": True,
        "objective.energy_l2": 0.1,
        "objective.input_noise": 0.005,
        "optim.lr": 1e-4,
        "optim.betas": (0.0, 0.999),
        "optim.warmup_steps": 0,
        "optim.schedule": "step",
        "optim.gamma": 0.97,
        "optim.step_epochs": 1,
        "train.epochs": 10,
    },
    # SPEC S3: MLP with LogSumExp energy, short-run chains from fresh noise (no buffer).
    "mlp": {
        "model.name": "mlp",
        "model.options": {},
        "sampler.persistent": False,
        "sampler.steps": 50,
        "sampler.step_size": 0.1,
        "sampler.noise": 0.01,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
        "objective.input_noise": 0.0,
        "train.epochs": 15,
    },
    # SPEC S1, the JEM paper's CIFAR-10 recipe (Grathwohl et al., 2020, App. H; wgrathwohl/JEM defaults):
    # WRN-28-10 without normalisation, LeakyReLU(0.2), K = 20, α = 1, σ = 0.01, buffer 10,000 with 5% re-init,
    # Adam 1e-4 with 1,000 warm-up iterations, batch 64, input noise 0.03, lr × 0.3 at epochs 160 and 180, and the
    # code's augmentation (reflect-pad 4, random crop, horizontal flip) for both the p(y|x) and the p(x) branch.
    # ~100 GPU-hours on one GPU in the paper; with torchrun the batch of 64 is per process (docs/distributed.md).
    "jem-cifar10": {
        "data.dataset": "cifar10",
        "data.augment": "crop_flip",
        "model.name": "wide_resnet",
        "model.options": {"depth": 28, "widen": 10, "norm": None, "act": "leaky_relu"},
        "optim.schedule": "multistep",
        "optim.milestones": (160, 180),
        "optim.gamma": 0.3,
        "train.epochs": 200,
        "train.log_every": 100,
    },
    # SPEC S4, JEM++ (Yang & Ji, ICCV 2021) for Fashion-MNIST/MNIST on a 2-core CPU: the default preset's network,
    # objective and optimiser, with JEM++'s sampler: informative initialisation from per-class Gaussians (full
    # covariance at 28×28) and K = 5 proximal SGLD steps (gradient clipped to ±1, no noise, as in the authors' code
    # sndnyang/JEMPP), run by the fast sampler (explicit input gradient on a CPU; chain groups where that does not
    # apply). PYLD is off here: on this 4-layer CNN the first layer is ~20% of a full step (it is <1% of
    # WRN-28-10), so its inner steps cost more than they save on a CPU; turn it on with sampler.pyld_steps=5
    # (jempp-cifar10 does).
    "jempp": {
        **_CPU_CNN,
        "sampler.steps": 5,
        "sampler.step_size": 1.0,
        "sampler.noise": 0.0,
        "sampler.grad_clamp": 1.0,
        "sampler.init": "gaussian",
        "sampler.init_covariance": "full",
        "sampler.buffer_size": 5000,
        "sampler.batch_size": 64,
        "sampler.impl": "fast",
        "sampler.chain_groups": 0,
        "objective.px": 0.3,
        "objective.energy_l2": 0.01,
        "train.channels_last": True,
    },
    # SPEC S4, JEM++ on CIFAR-10 as in the authors' script (sndnyang/JEMPP scripts/jempp_cifar10.sh): WRN-28-10
    # with BatchNorm, M = 5 SGLD steps with 5 PYLD inner steps of size 0.2 (clip ±1), no noise, informative
    # initialisation (a rank-100 + diagonal covariance per class instead of their full 3072×3072 one, which would
    # put 380 MB into every checkpoint), SGD lr 0.1 momentum 0.9, weight decay 4e-4, 1,000 warm-up iterations,
    # 150 epochs with lr × 0.2 at 50, 100 and 125, batch 64, input noise 0.03, buffer 10,000 with 5% re-init.
    "jempp-cifar10": {
        "data.dataset": "cifar10",
        "data.augment": "crop_flip",
        "model.name": "wide_resnet",
        "model.options": {"depth": 28, "widen": 10, "norm": "batch", "act": "leaky_relu"},
        "sampler.steps": 5,
        "sampler.step_size": 1.0,
        "sampler.noise": 0.0,
        "sampler.grad_clamp": 1.0,
        "sampler.pyld_steps": 5,
        "sampler.pyld_step_size": 0.2,
        "sampler.pyld_clamp": 1.0,
        "sampler.init": "gaussian",
        "sampler.init_covariance": "lowrank",
        "sampler.init_rank": 100,
        "sampler.impl": "fast",
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "optim.momentum": 0.9,
        "optim.weight_decay": 4e-4,
        "optim.warmup_steps": 1000,
        "optim.schedule": "multistep",
        "optim.milestones": (50, 100, 125),
        "optim.gamma": 0.2,
        "train.epochs": 150,
        "train.log_every": 100,
    },
    # SPEC S5, EGC (Guo et al., ICCV 2023) on Fashion-MNIST/MNIST for a 2-core CPU. The network is a small
    # UNet (base width 32, two resolutions, attention at the lower one) that works on 2×2 pixel patches (14×14,
    # then 7×7): the energy is differentiated twice per step (ε̂ = √(1 − ᾱ_t) ∇ₓE), so a full-resolution UNet costs
    # ~4× more per iteration for little gain at 28×28. The logit map and its energy stay per pixel (the official
    # form). Adam 1e-3 (as the JEM CPU presets; in smoke runs it lowered CE faster than 5e-4 at the same denoising
    # loss) with warm-up and grad-clip 1.0; EMA 0.999 because a one-hour run is only ~5,000 steps and
    # the paper's 0.9999 would average over twice that. CE weights: the paper's γ = 0.005 is tuned for ~1M steps;
    # here the classifier must train within ~5,000. At initialisation the clean-image CE gradient is ~0.4× the
    # denoising gradient (norms over all weights, measured on a Fashion-MNIST batch; docs/egc.md), so
    # γ_clean = 1 gives the t = 0 classifier, the one that is evaluated, a share of the updates comparable to
    # denoising, and γ = 0.1 keeps the noisy-image CE (which guidance reads) a smaller auxiliary term. Chosen from
    # that measurement and short smoke runs, not from a sweep: watch `ce` and `mse` in the log of a long run.
    "egc": {
        "objective.name": "egc",
        "objective.px": 0.0,
        "objective.input_noise": 0.0,
        "model.name": "egc_unet",
        "model.options": {
            "width": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attention": [2],
            "patch": 2,
            "energy": "map",
            "pool": "mean",
            "label_conditioning": True,
        },
        "optim.lr": 1e-3,
        "optim.warmup_steps": 200,
        "optim.grad_clip": 1.0,
        "train.batch_size": 64,
        "train.log_every": 50,
        "train.sample_every": 2,  # a grid is 144 guided DDIM-50 samples, ~20 s on 2 cores
        "egc.gamma": 0.1,
        "egc.gamma_clean": 1.0,
        "egc.ema": 0.999,
        "egc.sample_steps": 50,
    },
    # SPEC S5 at paper scale on CIFAR-10: γ = 0.005 for CE on noisy images (weighted by √ᾱ_t) and on clean ones,
    # label smoothing 0.2, 10% of labels dropped, grad-clip 1.0, EMA 0.9999, DDIM with 100 steps, linear schedule
    # with 1,000 steps. Not in SPEC S5 (taken from the DDPM CIFAR-10 model, Ho et al., 2020, which the EGC
    # backbone follows): UNet width 128, multipliers (1, 2, 2, 2), 2 residual blocks per resolution, attention at
    # 16×16, dropout 0.1, Adam 2e-4, batch 128, ~800k steps (2,000 epochs); the official attention pooling.
    "egc-cifar10": {
        "data.dataset": "cifar10",
        "objective.name": "egc",
        "objective.px": 0.0,
        "objective.input_noise": 0.0,
        "model.name": "egc_unet",
        "model.options": {
            "width": 128,
            "channel_mult": [1, 2, 2, 2],
            "num_res_blocks": 2,
            "attention": [2],
            "dropout": 0.1,
            "patch": 1,
            "energy": "map",
            "pool": "attention",
            "label_conditioning": True,
        },
        "optim.lr": 2e-4,
        "optim.warmup_steps": 1000,
        "optim.grad_clip": 1.0,
        "train.batch_size": 128,
        "train.epochs": 2000,
        "train.sample_every": 50,
        "train.checkpoint_every": 5,
        "egc.gamma": 0.005,
        "egc.gamma_clean": 0.005,
        "egc.label_smoothing": 0.2,
        "egc.label_dropout": 0.1,
        "egc.ema": 0.9999,
        "egc.sample_steps": 100,
    },
}
# The JEM recipe on the paper's other two datasets (its appendix reports CIFAR-100 and SVHN with the same WRN-28-10);
# SVHN takes no flip (a mirrored digit is another glyph: our choice).
PRESETS["jem-cifar100"] = {**PRESETS["jem-cifar10"], "data.dataset": "cifar100"}
PRESETS["jem-svhn"] = {**PRESETS["jem-cifar10"], "data.dataset": "svhn", "data.augment": "crop"}
PRESETS["jem"] = PRESETS["jem-cifar10"]  # the preset's earlier name, kept as an alias


# --- overrides and parsing -------------------------------------------------------------------------------------

_SECTIONS = ("data", "model", "sampler", "objective", "optim", "train", "recovery", "egc")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a string (from the command line) or JSON value to the annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = annotation(value) if annotation is float else _to_int(value)
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{key} must be {kind}, got {value!r}") from None
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a comma-separated list, got {value!r}")
        item_type = args[0] if args else str
        converted = tuple(_convert(v.strip() if isinstance(v, str) else v, item_type, key) for v in items)
        if len(args) == 2 and args[1] is not Ellipsis and len(converted) != 2:
            raise ConfigError(f"{key} needs exactly 2 values, got {value!r}")
        return converted
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{key} must be a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object, got {value!r}")
        return dict(value)
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        return int(float(value)) if "e" in value.lower() else int(value)
    return int(value)


def _parse_option(value: Any) -> Any:
    """Backbone options have no declared type here: read command-line strings as JSON when possible."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def set_value(config: Config, key: str, value: Any) -> None:
    """Set a dotted key such as ``sampler.steps`` (value converted and checked); unknown keys are errors."""
    parts = key.split(".")
    if key == "preset":
        config.preset = str(value)
        return
    if parts[0] not in _SECTIONS or len(parts) < 2:
        raise ConfigError(
            f"unknown config key '{key}'; keys look like <section>.<name> with section one of: {', '.join(_SECTIONS)}"
        )
    section = getattr(config, parts[0])
    name = parts[1]
    if parts[0] == "model" and name not in ("name", "energy_head", "options"):
        if len(parts) != 2:
            raise ConfigError(f"unknown config key '{key}'")
        section.options[name] = _parse_option(value)
        return
    if parts[0] == "model" and name == "options" and len(parts) == 3:
        section.options[parts[2]] = _parse_option(value)
        return
    types = _field_types(type(section))
    if name not in types or len(parts) != 2:
        raise ConfigError(f"unknown config key '{key}'; {parts[0]} has: {', '.join(types)}")
    setattr(section, name, _convert(value, types[name], key))


def parse_overrides(pairs: list[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` strings from the command line."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value (e.g. --set sampler.steps=10), got '{pair}'")
        key, value = pair.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def build_config(
    preset: str = "default", overrides: list[tuple[str, Any]] | None = None, validate: bool = True
) -> Config:
    """Defaults, then the preset, then the overrides in order; validated unless asked not to."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    config = Config(preset=preset)
    for key, value in PRESETS[preset].items():
        if key == "model.options":
            config.model.options = dict(value)
        else:
            set_value(config, key, value)
    for key, value in overrides or []:
        set_value(config, key, value)
    if validate:
        validate_config(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its JSON form (a run's config.json or a checkpoint); unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a JSON object")
    config = Config(preset=str(data.get("preset", "default")))
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in _SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section '{section}'; sections: {', '.join(_SECTIONS)}")
        for name, value in values.items():
            if section == "model" and name == "options":
                if not isinstance(value, dict):
                    raise ConfigError(f"model.options must be a JSON object, got {value!r}")
                config.model.options = dict(value)
            else:
                set_value(config, f"{section}.{name}", value)
    validate_config(config)
    return config


def load_config_file(path: str | Path) -> Config:
    """Read a config JSON file written by jemlab (or by hand)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the config file ({err.strerror or err}); pass a readable file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or regenerate it with --dry-run") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: JSON nested too deeply to be a jemlab config; regenerate it with --dry-run"
        ) from None
    return config_from_dict(data)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_finite(config: Config) -> None:
    """NaN and infinity pass most range checks (``nan > 0`` is False, ``inf > 0`` True): refuse them everywhere."""
    for section in _SECTIONS:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


def _validate_recovery(r: RecoveryConfig) -> None:
    _check(r.max_retries >= 0, f"recovery.max_retries must be >= 0, got {r.max_retries}")
    _check(r.snapshot_every >= 1, f"recovery.snapshot_every must be >= 1, got {r.snapshot_every}")
    _check(0 < r.lr_factor <= 1, f"recovery.lr_factor must be in (0, 1], got {r.lr_factor}")
    _check(r.sgld_steps_factor >= 1, f"recovery.sgld_steps_factor must be >= 1, got {r.sgld_steps_factor}")
    _check(r.max_sgld_steps >= 1, f"recovery.max_sgld_steps must be >= 1, got {r.max_sgld_steps}")
    _check(
        0 < r.sgld_step_size_factor <= 1,
        f"recovery.sgld_step_size_factor must be in (0, 1], got {r.sgld_step_size_factor}",
    )
    _check(r.energy_l2_factor >= 1, f"recovery.energy_l2_factor must be >= 1, got {r.energy_l2_factor}")
    _check(r.min_energy_l2 >= 0, f"recovery.min_energy_l2 must be >= 0, got {r.min_energy_l2}")
    _check(
        0 <= r.buffer_reset_fraction <= 1,
        f"recovery.buffer_reset_fraction must be in [0, 1], got {r.buffer_reset_fraction}",
    )
    for name in ("energy_gap_factor", "sgld_grad_factor"):
        _check(getattr(r, name) > 1, f"recovery.{name} must be > 1, got {getattr(r, name)}")
    for name in ("energy_gap_floor", "sgld_grad_floor"):
        _check(getattr(r, name) > 0, f"recovery.{name} must be > 0, got {getattr(r, name)}")
    _check(r.warmup_steps >= 0, f"recovery.warmup_steps must be >= 0, got {r.warmup_steps}")
    _check(r.collapse_patience >= 1, f"recovery.collapse_patience must be >= 1, got {r.collapse_patience}")
    _check(r.classifier_patience >= 0, f"recovery.classifier_patience must be >= 0, got {r.classifier_patience}")
    _check(r.gap_warning >= 0, f"recovery.gap_warning must be >= 0 (0 turns the warning off), got {r.gap_warning}")


def _validate_egc(config: Config) -> None:
    """EGC keys, and the objective/model pairing: the EGC loss needs the noise-conditional energy network."""
    e, o = config.egc, config.objective
    _check(o.name in ("jem", "egc"), f"objective.name must be jem or egc, got '{o.name}'")
    _check(e.schedule in ("linear", "cosine"), f"egc.schedule must be linear or cosine, got '{e.schedule}'")
    _check(e.timesteps >= 2, f"egc.timesteps must be >= 2, got {e.timesteps}")
    for name in ("gamma", "gamma_clean"):
        _check(getattr(e, name) >= 0, f"egc.{name} must be >= 0, got {getattr(e, name)}")
    _check(0 <= e.label_smoothing < 1, f"egc.label_smoothing must be in [0, 1), got {e.label_smoothing}")
    _check(0 <= e.label_dropout <= 1, f"egc.label_dropout must be in [0, 1], got {e.label_dropout}")
    _check(0 <= e.ema < 1, f"egc.ema must be in [0, 1), got {e.ema}")
    _check(e.sampler in ("ddim", "ddpm"), f"egc.sampler must be ddim or ddpm, got '{e.sampler}'")
    _check(
        1 <= e.sample_steps <= e.timesteps,
        f"egc.sample_steps must be in [1, egc.timesteps={e.timesteps}], got {e.sample_steps}",
    )
    _check(0 <= e.eta <= 1, f"egc.eta must be in [0, 1], got {e.eta}")
    _check(e.guidance >= 0, f"egc.guidance must be >= 0, got {e.guidance}")
    _check(e.precision in ("auto", "fp32", "bf16"), f"egc.precision must be auto, fp32 or bf16, got '{e.precision}'")
    if o.name == "egc":
        _check(
            config.model.name == "egc_unet",
            f"objective.name=egc needs model.name=egc_unet (the noise-conditional energy network), "
            f"got '{config.model.name}'; start from --preset egc",
        )
        _check(
            o.px == 0 and o.pxy == 0,
            "objective.name=egc draws no SGLD negatives: set objective.px=0 and objective.pxy=0",
        )


def validate_config(config: Config) -> None:
    """Range and choice checks; each failure names the key and the accepted values."""
    _validate_finite(config)
    d, m, s, o, opt, t = (
        config.data,
        config.model,
        config.sampler,
        config.objective,
        config.optim,
        config.train,
    )
    _check(d.val_size is None or d.val_size >= 0, f"data.val_size must be >= 0 or none, got {d.val_size}")
    _check(d.limit is None or d.limit > 0, f"data.limit must be > 0 or none, got {d.limit}")
    _check(
        d.augment in ("none", "crop", "crop_flip"),
        f"data.augment must be none, crop or crop_flip, got '{d.augment}'",
    )
    _check(d.augment_px in ("same", "none"), f"data.augment_px must be same or none, got '{d.augment_px}'")
    _check(
        m.energy_head in ("logsumexp", "separate"),
        f"model.energy_head must be logsumexp or separate, got '{m.energy_head}'",
    )
    _check(s.steps >= 0, f"sampler.steps must be >= 0, got {s.steps}")
    _check(s.step_size > 0, f"sampler.step_size must be > 0, got {s.step_size}")
    _check(s.noise >= 0, f"sampler.noise must be >= 0, got {s.noise}")
    _check(
        s.grad_clamp is None or s.grad_clamp > 0,
        f"sampler.grad_clamp must be > 0 or none, got {s.grad_clamp}",
    )
    _check(s.buffer_size >= 1, f"sampler.buffer_size must be >= 1, got {s.buffer_size}")
    _check(
        s.buffer_mode in ("fixed", "queue"),
        f"sampler.buffer_mode must be fixed or queue, got '{s.buffer_mode}'",
    )
    _check(0.0 <= s.reinit_prob <= 1.0, f"sampler.reinit_prob must be in [0, 1], got {s.reinit_prob}")
    _check(
        s.batch_size is None or s.batch_size >= 1,
        f"sampler.batch_size must be >= 1, got {s.batch_size}",
    )
    _check(
        s.precision in ("auto", "fp32", "bf16", "fp16"),
        f"sampler.precision must be auto, fp32, bf16 or fp16, got '{s.precision}'",
    )
    _check(
        s.init in ("uniform", "gaussian"),
        f"sampler.init must be uniform or gaussian, got '{s.init}'",
    )
    _check(
        s.init_covariance in ("diag", "lowrank", "full"),
        f"sampler.init_covariance must be diag, lowrank or full, got '{s.init_covariance}'",
    )
    _check(s.init_rank >= 1, f"sampler.init_rank must be >= 1, got {s.init_rank}")
    _check(
        s.init_max_per_class is None or s.init_max_per_class >= 2,
        f"sampler.init_max_per_class must be >= 2 or none, got {s.init_max_per_class}",
    )
    _check(s.impl in ("reference", "fast"), f"sampler.impl must be reference or fast, got '{s.impl}'")
    _check(
        not ((s.compile or s.cuda_graph) and s.impl != "fast"),
        "sampler.compile and sampler.cuda_graph need sampler.impl=fast",
    )
    _check(
        s.gradient in ("auto", "autograd", "explicit"),
        f"sampler.gradient must be auto, autograd or explicit, got '{s.gradient}'",
    )
    _check(
        s.gradient != "explicit" or (s.impl == "fast" and not s.compile and not s.cuda_graph),
        "sampler.gradient=explicit needs sampler.impl=fast without sampler.compile or sampler.cuda_graph",
    )
    _check(s.chain_groups >= 0, f"sampler.chain_groups must be >= 0 (0 = one per CPU thread), got {s.chain_groups}")
    _check(
        s.chain_groups == 1 or s.impl == "fast",
        "sampler.chain_groups other than 1 needs sampler.impl=fast",
    )
    _check(s.pyld_steps >= 0, f"sampler.pyld_steps must be >= 0, got {s.pyld_steps}")
    _check(s.pyld_step_size > 0, f"sampler.pyld_step_size must be > 0, got {s.pyld_step_size}")
    _check(
        s.pyld_clamp is None or s.pyld_clamp > 0,
        f"sampler.pyld_clamp must be > 0 or none, got {s.pyld_clamp}",
    )
    _check(
        not (s.class_conditional and s.buffer_mode != "fixed"),
        "sampler.class_conditional needs sampler.buffer_mode=fixed",
    )
    _check(
        o.pxy == 0 or s.persistent,
        "objective.pxy > 0 needs a persistent sampler (sampler.persistent=true)",
    )
    for name in ("ce", "px", "pxy", "energy_l2", "input_noise"):
        value = getattr(o, name)
        _check(value >= 0, f"objective.{name} must be >= 0, got {value}")
    _check(
        opt.name in ("adam", "adamw", "sgd"),
        f"optim.name must be adam, adamw or sgd, got '{opt.name}'",
    )
    _check(0 < opt.lr < 10, f"optim.lr must be in (0, 10), got {opt.lr}")
    _check(all(0 <= b < 1 for b in opt.betas), f"optim.betas must be in [0, 1), got {opt.betas}")
    _check(opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
    _check(
        opt.schedule in ("constant", "step", "multistep", "cosine"),
        f"optim.schedule must be constant, step, multistep or cosine, got '{opt.schedule}'",
    )
    _check(0 < opt.gamma <= 1, f"optim.gamma must be in (0, 1], got {opt.gamma}")
    _check(opt.step_epochs >= 1, f"optim.step_epochs must be >= 1, got {opt.step_epochs}")
    _check(
        opt.grad_clip is None or opt.grad_clip > 0,
        f"optim.grad_clip must be > 0 or none, got {opt.grad_clip}",
    )
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(
        t.minutes is None or t.minutes > 0,
        f"train.minutes (--minutes) must be > 0, got {t.minutes}",
    )
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _check(t.threads is None or t.threads >= 1, f"train.threads must be >= 1, got {t.threads}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(
        t.sample_every >= 1 and t.checkpoint_every >= 1,
        "train.sample_every and train.checkpoint_every must be >= 1",
    )
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _check(t.checkpoint_minutes > 0, f"train.checkpoint_minutes must be > 0, got {t.checkpoint_minutes}")
    _check(t.max_abs_energy > 0, f"train.max_abs_energy must be > 0, got {t.max_abs_energy}")
    _check(
        t.precision in ("auto", "fp32", "bf16", "fp16"),
        f"train.precision must be auto, fp32, bf16 or fp16 (fp16 needs a GPU), got '{t.precision}'",
    )
    _validate_recovery(config.recovery)
    _validate_egc(config)
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'",
    )
    from jemlab.models import backbone_options  # local: models import config-free code only

    allowed = backbone_options(m.name)
    unknown = sorted(set(m.options) - set(allowed))
    _check(
        not unknown,
        f"model '{m.name}' has no option(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}",
    )
