"""Validation: range and choice checks, one function per config section.

Each failure is one line that names the key and the accepted values (a clear error rather than a silent
correction). ``validate_config`` runs the sections in order; the checks that pair sections (the EGC objective and
its network, the backbone's options) come last.
"""

from __future__ import annotations

import dataclasses
import math

from jemlab.config.schema import (
    SECTIONS,
    Config,
    DataConfig,
    EGCConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    QualityConfig,
    RecoveryConfig,
    SamplerConfig,
    TrainConfig,
)
from jemlab.errors import ConfigError


def validate_config(config: Config) -> None:
    """Range and choice checks; each failure names the key and the accepted values.

    Args:
        config: a fully resolved config (defaults, preset and overrides applied).

    Raises:
        ConfigError: at the first value out of range, with a one-line message.
    """
    _validate_finite(config)
    _validate_data(config.data)
    _validate_model(config.model)
    _validate_sampler(config.sampler)
    _validate_sampler_init(config.sampler)
    _validate_sampler_impl(config.sampler)
    _validate_objective(config.objective, config.sampler)
    _validate_optim(config.optim)
    _validate_train(config.train)
    _validate_recovery(config.recovery)
    _validate_quality(config.quality)
    _validate_egc(config.egc)
    _validate_egc_pairing(config)
    _validate_semi_supervised(config)
    _validate_backbone_options(config.model)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(value: str, key: str, choices: tuple[str, ...], note: str = "") -> None:
    """``<key> must be a, b or c<note>, got '<value>'`` unless value is one of the choices."""
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}"
    _check(value in choices, f"{key} must be {listed}{note}, got '{value}'")


def _validate_finite(config: Config) -> None:
    """NaN and infinity pass most range checks (``nan > 0`` is False, ``inf > 0`` True): refuse them everywhere."""
    for section in SECTIONS:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


def _validate_data(d: DataConfig) -> None:
    _check(d.val_size is None or d.val_size >= 0, f"data.val_size must be >= 0 or none, got {d.val_size}")
    _check(d.limit is None or d.limit > 0, f"data.limit must be > 0 or none, got {d.limit}")
    _check(
        d.image_size is None or d.image_size >= 4,
        f"data.image_size must be a side length of 4 pixels or more (images are resized to N×N) or none, "
        f"got {d.image_size}",
    )
    _one_of(d.augment, "data.augment", ("none", "crop", "crop_flip"))
    _one_of(d.augment_px, "data.augment_px", ("same", "none"))
    _check(
        d.labels_per_class is None or d.labels_per_class >= 1,
        f"data.labels_per_class must be a positive integer (images per class) or none, got {d.labels_per_class}",
    )


def _validate_model(m: ModelConfig) -> None:
    _one_of(m.energy_head, "model.energy_head", ("logsumexp", "separate"))


def _validate_sampler(s: SamplerConfig) -> None:
    """The Langevin chain (SGLD and PYLD steps) and the replay buffer it runs in."""
    _check(s.steps >= 0, f"sampler.steps must be >= 0, got {s.steps}")
    _check(s.step_size > 0, f"sampler.step_size must be > 0, got {s.step_size}")
    _check(s.noise >= 0, f"sampler.noise must be >= 0, got {s.noise}")
    _check(s.grad_clamp is None or s.grad_clamp > 0, f"sampler.grad_clamp must be > 0 or none, got {s.grad_clamp}")
    _check(s.buffer_size >= 1, f"sampler.buffer_size must be >= 1, got {s.buffer_size}")
    _one_of(s.buffer_mode, "sampler.buffer_mode", ("fixed", "queue"))
    _check(0.0 <= s.reinit_prob <= 1.0, f"sampler.reinit_prob must be in [0, 1], got {s.reinit_prob}")
    _check(s.batch_size is None or s.batch_size >= 1, f"sampler.batch_size must be >= 1, got {s.batch_size}")
    _check(s.pyld_steps >= 0, f"sampler.pyld_steps must be >= 0, got {s.pyld_steps}")
    _check(s.pyld_step_size > 0, f"sampler.pyld_step_size must be > 0, got {s.pyld_step_size}")
    _check(s.pyld_clamp is None or s.pyld_clamp > 0, f"sampler.pyld_clamp must be > 0 or none, got {s.pyld_clamp}")
    _check(
        not (s.class_conditional and s.buffer_mode != "fixed"),
        "sampler.class_conditional needs sampler.buffer_mode=fixed",
    )


def _validate_sampler_init(s: SamplerConfig) -> None:
    """Where chains start: uniform noise or per-class Gaussians of the data (JEM++)."""
    _one_of(s.init, "sampler.init", ("uniform", "gaussian"))
    _one_of(s.init_covariance, "sampler.init_covariance", ("diag", "lowrank", "full"))
    _check(s.init_rank >= 1, f"sampler.init_rank must be >= 1, got {s.init_rank}")
    _check(
        s.init_max_per_class is None or s.init_max_per_class >= 2,
        f"sampler.init_max_per_class must be >= 2 or none, got {s.init_max_per_class}",
    )


def _validate_sampler_impl(s: SamplerConfig) -> None:
    """How the same chain is executed: precision, reference or fast sampler, and the fast sampler's options."""
    _one_of(s.precision, "sampler.precision", ("auto", "fp32", "bf16", "fp16"))
    _one_of(s.impl, "sampler.impl", ("reference", "fast"))
    _check(
        not ((s.compile or s.cuda_graph) and s.impl != "fast"),
        "sampler.compile and sampler.cuda_graph need sampler.impl=fast",
    )
    _one_of(s.gradient, "sampler.gradient", ("auto", "autograd", "explicit"))
    _check(
        s.gradient != "explicit" or (s.impl == "fast" and not s.compile and not s.cuda_graph),
        "sampler.gradient=explicit needs sampler.impl=fast without sampler.compile or sampler.cuda_graph",
    )
    _check(s.chain_groups >= 0, f"sampler.chain_groups must be >= 0 (0 = one per CPU thread), got {s.chain_groups}")
    _check(s.chain_groups == 1 or s.impl == "fast", "sampler.chain_groups other than 1 needs sampler.impl=fast")


def _validate_objective(o: ObjectiveConfig, s: SamplerConfig) -> None:
    _check(o.pxy == 0 or s.persistent, "objective.pxy > 0 needs a persistent sampler (sampler.persistent=true)")
    for name in ("ce", "px", "pxy", "energy_l2", "input_noise"):
        value = getattr(o, name)
        _check(value >= 0, f"objective.{name} must be >= 0, got {value}")
    _check(o.name in ("jem", "egc"), f"objective.name must be jem or egc, got '{o.name}'")


def _validate_optim(opt: OptimConfig) -> None:
    _one_of(opt.name, "optim.name", ("adam", "adamw", "sgd"))
    _check(0 < opt.lr < 10, f"optim.lr must be in (0, 10), got {opt.lr}")
    _check(all(0 <= b < 1 for b in opt.betas), f"optim.betas must be in [0, 1), got {opt.betas}")
    _check(opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
    _one_of(opt.schedule, "optim.schedule", ("constant", "step", "multistep", "cosine"))
    _check(0 < opt.gamma <= 1, f"optim.gamma must be in (0, 1], got {opt.gamma}")
    _check(opt.step_epochs >= 1, f"optim.step_epochs must be >= 1, got {opt.step_epochs}")
    _check(opt.grad_clip is None or opt.grad_clip > 0, f"optim.grad_clip must be > 0 or none, got {opt.grad_clip}")


def _validate_train(t: TrainConfig) -> None:
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.minutes is None or t.minutes > 0, f"train.minutes (--minutes) must be > 0, got {t.minutes}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'",
    )
    _check(t.threads is None or t.threads >= 1, f"train.threads must be >= 1, got {t.threads}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(
        t.sample_every >= 1 and t.checkpoint_every >= 1,
        "train.sample_every and train.checkpoint_every must be >= 1",
    )
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _check(t.checkpoint_minutes > 0, f"train.checkpoint_minutes must be > 0, got {t.checkpoint_minutes}")
    _check(t.max_abs_energy > 0, f"train.max_abs_energy must be > 0, got {t.max_abs_energy}")
    _one_of(t.precision, "train.precision", ("auto", "fp32", "bf16", "fp16"), note=" (fp16 needs a GPU)")


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
    _validate_recovery_detectors(r)


def _validate_recovery_detectors(r: RecoveryConfig) -> None:
    """The divergence detectors' thresholds and patience."""
    for name in ("energy_gap_factor", "sgld_grad_factor"):
        _check(getattr(r, name) > 1, f"recovery.{name} must be > 1, got {getattr(r, name)}")
    for name in ("energy_gap_floor", "sgld_grad_floor"):
        _check(getattr(r, name) > 0, f"recovery.{name} must be > 0, got {getattr(r, name)}")
    _check(r.warmup_steps >= 0, f"recovery.warmup_steps must be >= 0, got {r.warmup_steps}")
    _check(r.collapse_patience >= 1, f"recovery.collapse_patience must be >= 1, got {r.collapse_patience}")
    _check(r.classifier_patience >= 0, f"recovery.classifier_patience must be >= 0, got {r.classifier_patience}")
    _check(r.gap_warning >= 0, f"recovery.gap_warning must be >= 0 (0 turns the check off), got {r.gap_warning}")
    _check(
        r.quality_drop == 0 or r.quality_drop > 1,
        f"recovery.quality_drop must be > 1 (a factor over the best tracked Fréchet distance) or 0 (off), "
        f"got {r.quality_drop}",
    )
    _one_of(r.drift_action, "recovery.drift_action", ("recover", "warn"))


def _validate_quality(q: QualityConfig) -> None:
    _check(q.every >= 0, f"quality.every must be >= 0 (0 turns tracking off), got {q.every}")
    _check(q.samples >= 2, f"quality.samples must be >= 2 (a Fréchet distance needs a covariance), got {q.samples}")
    _check(q.per_class >= 0, f"quality.per_class must be >= 0 (0: no class-conditional samples), got {q.per_class}")


def _validate_egc(e: EGCConfig) -> None:
    _one_of(e.parameterisation, "egc.parameterisation", ("energy", "epsilon"))
    _one_of(e.schedule, "egc.schedule", ("linear", "cosine"))
    _check(e.timesteps >= 2, f"egc.timesteps must be >= 2, got {e.timesteps}")
    for name in ("gamma", "gamma_clean"):
        _check(getattr(e, name) >= 0, f"egc.{name} must be >= 0, got {getattr(e, name)}")
    _check(0 <= e.label_smoothing < 1, f"egc.label_smoothing must be in [0, 1), got {e.label_smoothing}")
    _check(0 <= e.label_dropout <= 1, f"egc.label_dropout must be in [0, 1], got {e.label_dropout}")
    _check(
        0 <= e.ce_trunk_grad <= 1,
        f"egc.ce_trunk_grad must be in [0, 1] (1: the CE terms train the whole network), got {e.ce_trunk_grad}",
    )
    _check(e.min_snr >= 0, f"egc.min_snr must be >= 0 (0: uniform weighting; Hang et al. use 5), got {e.min_snr}")
    _check(0 <= e.ema < 1, f"egc.ema must be in [0, 1), got {e.ema}")
    _one_of(e.sampler, "egc.sampler", ("ddim", "ddpm"))
    _check(
        1 <= e.sample_steps <= e.timesteps,
        f"egc.sample_steps must be in [1, egc.timesteps={e.timesteps}], got {e.sample_steps}",
    )
    _check(0 <= e.eta <= 1, f"egc.eta must be in [0, 1], got {e.eta}")
    _check(e.guidance >= 0, f"egc.guidance must be >= 0, got {e.guidance}")
    _check(
        e.label_guidance >= 0,
        f"egc.label_guidance must be >= 0 (1: the label-conditioned energy alone), got {e.label_guidance}",
    )
    _one_of(e.precision, "egc.precision", ("auto", "fp32", "bf16"))


def _validate_egc_pairing(config: Config) -> None:
    """The EGC objective needs the noise-conditional energy network and draws no SGLD negatives."""
    if config.objective.name != "egc":
        return
    _check(
        config.model.name == "egc_unet",
        f"objective.name=egc needs model.name=egc_unet (the noise-conditional energy network), "
        f"got '{config.model.name}'; start from --preset egc",
    )
    _check(
        config.objective.px == 0 and config.objective.pxy == 0,
        "objective.name=egc draws no SGLD negatives: set objective.px=0 and objective.pxy=0",
    )
    _validate_egc_parameterisation(config)


def _validate_egc_parameterisation(config: Config) -> None:
    """The UNet's output head matches egc.parameterisation; the ε-prediction control has no classifier to guide."""
    from jemlab.models import egc_unet as unet  # local, as in `_validate_backbone_options`: the UNet's own choices

    e, options = config.egc, config.model.options
    output = options.get("output", "logits")
    for key, choices, what in (
        ("output", unet.OUTPUTS, "the EGC UNet's output head"),
        ("energy_scale", unet.ENERGY_SCALES, "how the energy's gradient becomes the noise estimate"),
        ("energy_base", unet.ENERGY_BASES, "a standard-normal energy ½‖x_t‖² added to the network's"),
        ("energy", unet.ENERGIES, "the EGC UNet's energy"),
        ("pool", unet.POOLS, "how the EGC UNet's logit map becomes class logits"),
        ("classifier", unet.CLASSIFIERS, "what the EGC UNet's classifier reads: the logit map, or its own head"),
    ):
        _one_of(options.get(key) or choices[0], f"model.{key}", choices, f" ({what})")
    if e.parameterisation == "epsilon":
        _check(
            output == "epsilon",
            f"egc.parameterisation=epsilon (the plain ε-prediction control) needs the UNet's ε head: set "
            f"model.output=epsilon (got '{output}'), or start from --preset egc-control",
        )
        _check(
            e.guidance == 0,
            f"classifier guidance (egc.guidance={e.guidance:g}) needs a classifier, and egc.parameterisation=epsilon "
            f"(the plain ε-prediction control) has none: use --guidance 0 (egc.guidance=0; per-class samples then "
            f"come from the label conditioning)",
        )
        _check(
            config.model.options.get("label_conditioning", True) is True,
            "egc.parameterisation=epsilon draws its per-class samples (training grids, --per-class) through the "
            "label conditioning: keep model.label_conditioning=true",
        )
    else:
        _check(
            output == "logits",
            f"model.output={output} gives the UNet no energy: it belongs to egc.parameterisation=epsilon "
            f"(--preset egc-control); EGC's energy parameterisation needs model.output=logits",
        )
    _check(
        e.label_guidance == 1 or config.model.options.get("label_conditioning", True) is not False,
        f"egc.label_guidance={e.label_guidance:g} (classifier-free guidance) needs a label-conditioned network, and "
        f"this config sets model.label_conditioning=false: keep egc.label_guidance=1 and guide with egc.guidance",
    )


def _validate_semi_supervised(config: Config) -> None:
    """data.labels_per_class: JEM and the softmax baseline only, without the p(x|y) term, and enough labelled images
    per class for a data-fitted chain initialiser."""
    n = config.data.labels_per_class
    if n is None:
        return
    _check(
        config.objective.name == "jem",
        "data.labels_per_class is supported with objective.name=jem (JEM and --preset softmax), not egc; "
        "drop data.labels_per_class",
    )
    _check(
        config.objective.pxy == 0,
        "data.labels_per_class does not support the p(x|y) term yet; set objective.pxy=0",
    )
    _check(
        n >= 2 or config.sampler.init != "gaussian",
        "data.labels_per_class=1 is too few for sampler.init=gaussian (its class Gaussians are fitted on the labelled "
        "images, 2 per class at least); use sampler.init=uniform or data.labels_per_class=2 or more",
    )


def _validate_backbone_options(m: ModelConfig) -> None:
    """``model.<option>`` keys against the backbone's keyword arguments (and the model name against the registry)."""
    from jemlab.models import backbone_options  # local: models import config-free code only

    allowed = backbone_options(m.name)
    unknown = sorted(set(m.options) - set(allowed))
    _check(
        not unknown,
        f"model '{m.name}' has no option(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}",
    )
