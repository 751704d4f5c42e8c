"""The config schema: one dataclass per section, each field with its default and what it means.

Everything a run can be told lives here; presets (``presets/*.toml``) and ``--set section.key=value`` overrides only
change these fields, and ``validation.py`` checks their ranges.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    # a registry name (fashion-mnist, mnist, mnist-5k, cifar10, cifar100, svhn) or the path of your own images: a
    # folder of class sub-folders or an .npz (docs/data.md)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # explicit folder with the dataset's files (searched first)
    image_size: int | None = None  # resize every image to N×N pixels (bilinear, antialiased); None keeps the size
    val_size: int | None = None  # held-out validation images; None = min(5000, a tenth of the training set)
    limit: int | None = None  # use only this many training images (quick runs, tests)
    download: bool = True  # fetch from the official URLs if the files are nowhere on disk
    augment: str = "none"  # training images for log p(y|x): none, crop (reflect-pad 4, random crop) or crop_flip
    augment_px: str = "same"  # images for log p(x): same (as the CE branch) or none (unaugmented; SADA-JEM)
    # Semi-supervised (docs/semi_supervised.md): cross-entropy on only this many training images per class (a
    # class-balanced subset chosen with train.seed); log p(x) on every training image. None = all labels.
    labels_per_class: int | None = None


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
    impl: str = "reference"  # reference (the plain sgld function) or fast (accel/fast.py: same math, faster)
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
    # also checkpoint after this many minutes without one: a kill loses at most this much training (a default-preset
    # checkpoint, ~17 MB, is written atomically in 0.03-0.08 s on a 2-core CPU, so every 2 minutes costs < 0.1%)
    checkpoint_minutes: float = 2.0
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
    # Slow drift (docs/reliability.md): the logged data-sample energy gap |E(x_data) − E(x_model)| above
    # `gap_warning` once it had been below it, or a tracked Fréchet distance (quality.every) above `quality_drop` ×
    # the best so far. Healthy default/jempp runs keep the gap below 0.3; runs whose replay buffer collapsed reached
    # 22–25. With drift_action=recover the run rolls back to the last state whose samples were measured healthy and
    # goes on with the policy's changes (as for a divergence); with warn it only logs a warning. 0 turns a check off.
    gap_warning: float = 5.0
    quality_drop: float = 3.0
    drift_action: str = "recover"  # recover or warn


@dataclass
class QualityConfig:
    """Sample quality tracked while training (docs/reliability.md): Fréchet distance and KID against held-out images
    in the domain feature space of `jemlab eval --parts samples`, and the variety within each class."""

    every: int = 1000  # iterations between measurements (plus one at the end); 0 turns tracking off
    samples: int = 500  # held-out (validation) images, and replay-buffer samples, per measurement
    per_class: int = 50  # class-conditional samples per class, drawn as `jemlab sample --per-class` draws them
    fresh: bool = True  # also score `samples` chains started from the initialiser (K steps), besides the buffer
    seed: int = 0  # seed of the measurement's own draws (the training's random streams are not touched)
    # the dataset's cached reference feature net (<cache>/feature_nets/<dataset>/<fingerprint>/); trained and cached
    # on first use when missing (about a minute for Fashion-MNIST on 2 cores), unless this is false (tracking is then
    # skipped)
    train_feature_net: bool = True
    keep_best: bool = True  # checkpoints/best-samples.safetensors: the state with the lowest tracked Fréchet distance


@dataclass
class EGCConfig:
    """EGC (Guo et al., ICCV 2023; SPEC S5), read when objective.name=egc: noise schedule, loss, EMA, sampler."""

    # energy: EGC, ε̂ = √(1 − ᾱ_t)∇ₓE(x_t, t) plus the CE terms; epsilon: the control, a plain ε-prediction diffusion
    # model of the same UNet (model.output=epsilon: the output head emits ε̂), denoising loss only, no classifier
    parameterisation: str = "energy"
    schedule: str = "linear"  # β schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)
    timesteps: int = 1000  # T diffusion steps
    gamma: float = 0.005  # weight of CE(f(x_t, t), y)·√ᾱ_t on noisy images (EGC: 0.001–0.005)
    gamma_clean: float = 0.005  # weight of CE(f(x_0, 0), y) on clean images
    label_smoothing: float = 0.2  # of both CE terms
    label_dropout: float = 0.1  # fraction of labels replaced by "no label" in the denoising term
    # share of the CE terms' gradient that reaches the UNet's trunk: 1 (as published) all of it; 0 the classifier
    # reads the denoiser's features without training them (with model.classifier=head, only its head learns)
    ce_trunk_grad: float = 1.0
    min_snr: float = 0.0  # Min-SNR-γ weighting of the denoising term, min(SNR_t, γ)/SNR_t (Hang et al.); 0: uniform
    ema: float = 0.9999  # decay of the EMA weights used for evaluation and sampling
    ema_warmup: bool = True  # decay min(ema, (1 + n)/(10 + n)) after n updates, so short runs get a useful EMA
    sampler: str = "ddim"  # ddim (deterministic for eta=0) or ddpm (ancestral)
    sample_steps: int = 100  # sampler steps (a subsequence of the T timesteps)
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic, 1 = DDPM-like)
    guidance: float = 1.0  # scale of the model's own classifier gradient for class-conditional samples
    label_guidance: float = 1.0  # classifier-free weight w of a label-conditioned network (1: its conditional alone)
    clip_x0: bool = True  # clip the predicted clean image to [−1, 1] at each sampler step
    # autocast of the training forward passes: auto (bf16 where the device runs it natively, else fp32: as
    # sampler.precision; the EGC step measured 1.5x faster in bf16 on an AVX512_BF16 CPU), fp32 or bf16
    precision: str = "auto"


@dataclass
class Config:
    """A whole run's settings: the preset it started from and one dataclass per section (see SECTIONS)."""

    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    egc: EGCConfig = field(default_factory=EGCConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (tuples stay tuples); ``to_json`` is what a run saves as config.json."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# The sections of a Config, in the order they are written to config.json.
SECTIONS = ("data", "model", "sampler", "objective", "optim", "train", "recovery", "quality", "egc")
