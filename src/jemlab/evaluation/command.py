"""From a trained run to the evaluation suite: what ``jemlab eval --all`` and ``jemlab fid-ref`` do.

The metric code in this package takes callables and tensors and knows nothing about runs. This module is the
glue for one loaded run (:func:`jemlab.run.load_run`):

- ``sample_fn``: :func:`jemlab.generate.generate` with the run's sampler (chains from the replay buffer when the
  run kept one, else from noise), recording the protocol of every call;
- ``defend_fn``: the JEM SGLD-refinement defence (Grathwohl et al., 2020, Sec. 5.3) on the run's own energy, with
  the run's SGLD step size, noise and gradient clip, differentiable so that PGD attacks it through the refinement
  (expectation over transformation, Athalye et al., 2018);
- OOD sets: the synthetic ones of :func:`jemlab.evaluation.ood_sets.build_ood_sets` plus the test split of a related
  dataset (Fashion-MNIST ↔ MNIST, CIFAR ↔ SVHN/CIFAR-100) when its files are on disk and its images have the
  model's shape;
- the domain feature net for Fréchet distance/KID, trained once per dataset and cached under
  ``<cache>/feature_nets/<dataset>/<fingerprint of the test split>/`` (``<cache>`` = ``--cache-dir``,
  ``$JEMLAB_DATA`` or ``~/.cache/jemlab``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jemlab.data import DatasetSplits, load_dataset
from jemlab.errors import JemlabError
from jemlab.evaluation.robustness import LOSS_NAMES, langevin_defence
from jemlab.evaluation.suite import SampleFn, SuiteOptions, run_suite
from jemlab.evaluation.suite_context import has_classifier
from jemlab.generate import generate
from jemlab.quality.feature_net import FeatureNet
from jemlab.quality.reference import feature_net_path, reference_feature_net, train_reference_feature_net
from jemlab.run import LoadedRun
from jemlab.sampling import frozen
from jemlab.training.evaluate import evaluate_split

__all__ = [
    "OOD_PARTNERS",
    "evaluate_run",
    "feature_net_path",
    "make_defend_fn",
    "make_sample_fn",
    "partner_ood_sets",
    "reference_feature_net",
    "train_reference_feature_net",
]

#: For each dataset, groups of OOD partner datasets; the first dataset of a group that loads is used.
OOD_PARTNERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "fashion-mnist": (("mnist", "mnist-5k"),),
    "mnist": (("fashion-mnist",),),
    "mnist-5k": (("fashion-mnist",),),
    "cifar10": (("svhn",), ("cifar100",)),
    "cifar100": (("svhn",), ("cifar10",)),
    "svhn": (("cifar10",), ("cifar100",)),
}



# ---------------------------------------------------------------- sampling and the defence


def make_sample_fn(
    run: LoadedRun, *, steps: int | None = None, init: str = "auto", protocols: list[dict[str, Any]] | None = None
) -> SampleFn:
    """A ``sample_fn(n, labels | None, generator)`` for :func:`run_suite` built on :func:`jemlab.generate.generate`.

    Args:
        run: The loaded run (model, sampler config, replay buffer).
        steps: SGLD steps per chain (None: the run's ``sampler.steps``).
        init: ``"auto"`` (the replay buffer when the run has one), ``"buffer"`` or ``"noise"``.
        protocols: If given, the protocol dict of every call (init, steps, α, σ, n, conditional) is appended.

    Returns:
        The sampling callable; images in [-1, 1] on the CPU.
    """

    def sample_fn(n: int, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        x, protocol = generate(run, n, labels=labels, steps=steps, init=init, generator=generator)
        if protocols is not None:
            protocols.append(protocol)
        return x

    return sample_fn


def make_defend_fn(
    run: LoadedRun,
    *,
    steps: int,
    init_noise: float = 0.03,
    step_size: float | None = None,
    noise: float | None = None,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """The JEM defence: K differentiable SGLD steps on the run's energy before classifying.

    The step size α, noise σ and gradient clip default to the run's sampler settings, i.e. the dynamics the
    energy was trained against (α = 1, σ = 0.01 for JEM; α = 10 with a ±0.03 clip for the course model).

    Args:
        run: The loaded run; its ``model.energy`` is the energy (a separate head where the model has one).
        steps: K refinement steps.
        init_noise: σ of the Gaussian noise added once before refining (JEM: 0.03).
        step_size: α (None: ``sampler.step_size``).
        noise: σ per step (None: ``sampler.noise``).
        generator: Random source of the refinement noise.

    Returns:
        ``defend(x) -> x_refined``, differentiable in x.
    """
    s = run.config.sampler
    run_step_size, run_noise = _langevin_settings(run)
    return langevin_defence(
        run.model.energy,
        steps=steps,
        step_size=run_step_size if step_size is None else step_size,
        noise_std=run_noise if noise is None else noise,
        init_noise_std=init_noise,
        generator=generator,
        grad_clamp=s.grad_clamp,
    )


def _langevin_settings(run: LoadedRun) -> tuple[float, float]:
    """(α, σ) of the run's own Langevin dynamics: sampler.* for JEM runs, the t = 0 noise level for EGC runs."""
    if run.config.objective.name == "egc":
        from jemlab.generate.egc import langevin_at_t0

        return langevin_at_t0(run.config, run.model)
    return run.config.sampler.step_size, run.config.sampler.noise


# ---------------------------------------------------------------- OOD datasets


def _match_channels(x: Tensor, channels: int) -> Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3 and channels == 1:  # ITU-R BT.601 luma, the usual greyscale conversion
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).reshape(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    if x.shape[1] == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    raise JemlabError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def partner_ood_sets(
    dataset: str,
    image_shape: Sequence[int],
    n: int,
    *,
    names: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    exclude_source: str | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Test images of related datasets, to serve as OOD sets for a model trained on ``dataset``.

    Nothing is downloaded: a dataset whose files are not on disk is skipped with a note. Images whose
    height/width differ from the model's are skipped too (resizing would add its own artefacts); greyscale ↔
    colour is converted.

    Args:
        dataset: The in-distribution dataset (canonical name).
        image_shape: The model's (C, H, W).
        n: Images per OOD set (a seeded random subset of the test split).
        names: Datasets to try, each its own set; None uses :data:`OOD_PARTNERS` (first loadable of each group).
        data_dir: The user's data folder; only its ``<name>/`` subfolder is searched, so that files lying
            directly in it (the in-distribution dataset's) are never taken for another dataset.
        seed: Seed of the subset.
        exclude_source: Skip a set read from this source (the in-distribution files).

    Returns:
        ``(sets, notes)``: name -> (n, C, H, W) float images in [-1, 1], and one note per set used or skipped.
    """
    groups = OOD_PARTNERS.get(dataset, ()) if names is None else tuple((name,) for name in names)
    sets: dict[str, Tensor] = {}
    notes: list[str] = []
    if not groups:
        reason = "none requested" if names is not None else f"none is known for {dataset}"
        notes.append(f"OOD: no related dataset ({reason}); only synthetic OOD sets are used.")
    for group in groups:
        problems: list[str] = []
        for name in group:
            folder = Path(data_dir) / name if data_dir is not None and (Path(data_dir) / name).is_dir() else None
            try:
                splits = load_dataset(name, folder, val_size=0, seed=seed, download=False)
            except JemlabError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if exclude_source is not None and splits.source == exclude_source:
                problems.append(f"{name}: resolves to the in-distribution files ({splits.source})")
                continue
            shape = splits.image_shape
            if tuple(shape[1:]) != tuple(image_shape[1:]):
                problems.append(
                    f"{name}: images are {shape[1]}x{shape[2]}, the model takes {image_shape[1]}x{image_shape[2]}"
                )
                continue
            test = splits.test
            gen = torch.Generator().manual_seed(seed)
            index = torch.randperm(len(test), generator=gen)[: min(n, len(test))].sort().values
            x, _ = test.batch(index)
            sets[splits.name] = _match_channels(x, int(image_shape[0])).contiguous()
            converted = (
                "" if shape[0] == image_shape[0] else f", converted from {shape[0]} to {image_shape[0]} channels"
            )
            notes.append(f"OOD set {splits.name}: {len(x)} test images from {splits.source}{converted}.")
            break
        else:
            notes.append(f"OOD: skipped {' / '.join(group)} ({'; '.join(problems)}).")
    return sets, notes


# ---------------------------------------------------------------- the whole evaluation

#: What an EGC run's sample protocol adds to the samples part's (absent for JEM runs).
_EGC_PROTOCOL_KEYS = ("parameterisation", "sampler", "eta", "guidance", "label_guidance", "schedule", "weights")


def _protocol_entries(
    metrics: dict[str, Any],
    opts: SuiteOptions,
    sample_protocols: list[dict[str, Any]],
    ood_notes: list[str],
    ood_names: list[str],
    defence: dict[str, Any] | None,
) -> None:
    """Put each part's protocol next to its numbers (a ``protocol`` entry in its section)."""
    n_test = metrics.get("setup", {}).get("n_test")
    if "classification" in metrics:
        metrics["classification"]["protocol"] = {"n_test_images": n_test}
    if "calibration" in metrics:
        metrics["calibration"]["protocol"] = {
            "n_test_images": n_test,
            "bins": opts.calibration_bins,
            "temperature_scaling": opts.temperature_scaling,
        }
    if "ood" in metrics:
        metrics["ood"]["protocol"] = {
            "n_in_distribution": min(opts.n_ood, n_test or opts.n_ood),
            "n_per_ood_set": opts.n_ood,
            "dataset_sets": ood_names,
            "synthetic_sets": list(opts.synthetic_ood),
            "scores": list(opts.ood_scores),
            "dataset_notes": ood_notes,
        }
    if "robustness" in metrics:
        metrics["robustness"]["protocol"] = {
            "attack": f"PGD (Madry et al., 2018) on the {LOSS_NAMES[opts.pgd_loss]}, best iterate kept",
            "loss": opts.pgd_loss,
            "n_images": opts.pgd_n,
            "steps": opts.pgd_steps,
            "step_size": "2.5 * eps / steps",
            "restarts": opts.pgd_restarts,
            "eps_units": "[0, 1] pixels",
            "defence": defence or "not evaluated (--defence-steps 0)",
        }
    if "samples" in metrics:
        first = sample_protocols[0] if sample_protocols else {}
        metrics["samples"]["protocol"] = {
            "n_unconditional": opts.n_samples,
            "n_conditional": opts.n_samples if opts.conditional_samples else 0,
            "chains_from": first.get("init"),
            "sgld_steps": first.get("steps"),
            "step_size": first.get("step_size"),
            "noise": first.get("noise"),
            **{k: first[k] for k in _EGC_PROTOCOL_KEYS if k in first},
            "sampler_calls": len(sample_protocols),
        }
        conditional = next((p for p in sample_protocols if p.get("conditional")), None)
        if conditional is not None and "guidance" in conditional:
            metrics["samples"]["protocol"]["guidance_conditional"] = conditional["guidance"]
            metrics["samples"]["protocol"]["label_guidance_conditional"] = conditional["label_guidance"]


def evaluate_run(
    run: LoadedRun,
    splits: DatasetSplits,
    out_dir: str | Path,
    options: SuiteOptions,
    *,
    ood_datasets: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    sample_steps: int | None = None,
    sample_init: str = "auto",
    feature_net: FeatureNet | None = None,
    feature_net_info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run :func:`run_suite` on a loaded run and its dataset; writes metrics.json, report.html and report.md.

    The top level of the result also holds ``test_accuracy`` and ``test_nll`` on the *whole* test split (the
    numbers of the fast ``jemlab eval`` path), the checkpoint and the dataset.

    Args:
        run: The loaded run.
        splits: Its dataset (``test`` and ``val`` are used).
        out_dir: Report folder.
        options: Suite sizes and switches (a copy is used; ``dataset_name`` and the defence step size and noise
            are filled in from the run).
        ood_datasets: Related datasets to use as OOD sets (None: :data:`OOD_PARTNERS`; empty: none).
        data_dir: The user's data folder (its ``<name>/`` subfolders are searched for the OOD datasets).
        sample_steps: SGLD steps per sample chain (None: the run's ``sampler.steps``).
        sample_init: ``"auto"``, ``"buffer"`` or ``"noise"``.
        feature_net: Domain feature net for FD/KID (None: FD/KID skipped with a note).
        feature_net_info: What :func:`reference_feature_net` said about it (recorded in the report).
        log: Progress callback.

    Returns:
        The metrics dict written to ``out_dir/metrics.json``.
    """
    say = log or (lambda _msg: None)
    notes: list[str] = [f"checkpoint: {run.path}"]
    labels_per_class = run.config.data.labels_per_class
    if labels_per_class is not None:  # a semi-supervised run: say what the classifier was taught with
        notes.append(
            f"Label budget: trained with {labels_per_class} labels per class (data.labels_per_class; "
            f"log p(x) on every training image)."
        )
    opts = dataclasses.replace(options, dataset_name=splits.name)

    sample_protocols: list[dict[str, Any]] = []
    sample_fn = None
    if "samples" in opts.parts:
        sample_fn = make_sample_fn(run, steps=sample_steps, init=sample_init, protocols=sample_protocols)
        if run.buffer is None and sample_init != "noise" and run.config.objective.name != "egc":
            notes.append("Samples: the run kept no replay buffer, so chains start from noise.")

    ood_sets: dict[str, Tensor] = {}
    ood_notes: list[str] = []
    if "ood" in opts.parts and has_classifier(run.model):  # a model without one skips the part (run_suite)
        ood_sets, ood_notes = partner_ood_sets(
            splits.name,
            splits.image_shape,
            opts.n_ood,
            names=ood_datasets,
            data_dir=data_dir,
            seed=opts.seed,
            exclude_source=getattr(splits, "source", None),
        )
        notes.extend(ood_notes)

    defend_fn, defence = _defence(run, opts, notes)

    if "samples" in opts.parts:
        notes.extend(_feature_net_notes(feature_net, feature_net_info))

    test_metrics = evaluate_split(run.model, splits.test, run.device, prefix="test")

    def finalize(metrics: dict[str, Any]) -> None:
        _protocol_entries(metrics, opts, sample_protocols, ood_notes, sorted(ood_sets), defence)
        if feature_net_info and "samples" in metrics:
            metrics["samples"]["feature_net_cache"] = dict(feature_net_info)
        head = {"checkpoint": str(run.path), "dataset": splits.name, **test_metrics}
        if labels_per_class is not None:
            head["labels_per_class"] = labels_per_class
        rest = dict(metrics)
        metrics.clear()
        metrics.update(head)
        metrics.update(rest)

    opts.extra_notes = (*opts.extra_notes, *notes)
    # Parameters frozen for the whole run: every gradient the suite takes (grad-norm score, PGD, the defence)
    # is with respect to the input only, so autograd need not build graphs through the weights.
    with frozen(run.model):
        return run_suite(
            run.model,
            splits,
            out_dir,
            ood_sets=ood_sets,
            sample_fn=sample_fn,
            feature_net=feature_net,
            options=opts,
            defend_fn=defend_fn,
            log=say,
            finalize=finalize,
        )


def _defence(run: LoadedRun, opts: SuiteOptions, notes: list[str]) -> tuple[Callable | None, dict[str, Any] | None]:
    """The SGLD refinement defence the robustness part attacks (None, None when it is off), and its protocol.

    Fills the defence's step size and noise into `opts` from the run's sampler and adds a note on clipping."""
    if "robustness" not in opts.parts or opts.defence_steps <= 0 or not has_classifier(run.model):
        return None, None
    s = run.config.sampler
    opts.defence_step_size, opts.defence_noise = _langevin_settings(run)
    defend_fn = make_defend_fn(
        run,
        steps=opts.defence_steps,
        init_noise=opts.defence_init_noise,
        generator=torch.Generator().manual_seed(opts.seed + 1),
    )
    defence = {
        "method": "SGLD refinement of the input on the model's energy, logits averaged over chains",
        "attack": "EOT: PGD differentiates through every refinement step (no BPDA approximation)",
        "steps": opts.defence_steps,
        "step_size": opts.defence_step_size,
        "noise": opts.defence_noise,
        "grad_clamp": s.grad_clamp,
        "init_noise": opts.defence_init_noise,
        "chains": opts.defence_chains,
        "eot_samples": opts.defence_eot,
        "n_images": min(opts.defence_n, opts.pgd_n),
    }
    if s.grad_clamp is not None:
        notes.append(f"JEM defence: the energy gradient is clipped to ±{s.grad_clamp} as in the run's sampler.")
    return defend_fn, defence


def _feature_net_notes(feature_net: FeatureNet | None, info: dict[str, Any] | None) -> list[str]:
    """What the report says about the domain feature net behind FD/KID (skipped, or where it came from)."""
    if feature_net is None:
        return [(info or {}).get("note", "Fréchet distance/KID skipped: no feature net.")]
    if info and info.get("note"):
        note = str(info["note"]).rstrip(".")
        return [note[:1].upper() + note[1:] + "."]
    return []
