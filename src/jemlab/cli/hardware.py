"""`jemlab hardware`: what the hardware probe finds on this machine, and what a preset's settings resolve to here.

The same findings and choices a run prints in its header and saves in ``metrics.json`` (`jemlab.accel`,
`jemlab.training.choices`), without loading data or training: the preset's model is built with the image shape
of its dataset, from the table below.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from jemlab.errors import ConfigError

# dataset → ((C, H, W), number of classes), so that the preset's model can be built without loading the data
IMAGE_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "mnist-5k": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
}


def add_parser(sub: Any) -> None:
    from jemlab.config import PRESETS

    p = sub.add_parser(
        "hardware",
        help="what the hardware probe finds here and what a preset's settings resolve to",
        description=(
            "Probe this machine as a run would (each capability tried here, with the reason) and resolve a preset's "
            "precisions and SGLD gradient path on it. JEMLAB_PROBE=avx2 answers as an AVX2 CPU without AVX-512 would "
            "(docs/hardware.md)."
        ),
    )
    p.add_argument(
        "--device", type=_device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    p.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="preset whose settings are resolved (default: %(default)s; `jemlab presets` describes them)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.set_defaults(func=run)


def _device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{text}'")
    return text


def run(args: argparse.Namespace) -> int:
    from jemlab.accel import probe
    from jemlab.config import build_config
    from jemlab.training.choices import header_lines, run_choices

    config = build_config(args.preset, [])
    device = _resolve(args.device)
    choices = run_choices(config, _preset_model(config, device), device)
    if args.json:
        record = {
            **probe(device).summary(),
            "preset": args.preset,
            "choices": {key: choice.as_dict() for key, choice in choices.items()},
        }
        print(json.dumps(record, indent=2))
        return 0
    print(header_lines(choices, device)[0])
    print()
    _print_table(["capability", "ok", "reason"], _capability_rows(device))
    print()
    print(f"preset {args.preset} ({config.data.dataset}, model {config.model.name}) on {device}:")
    _print_table(["setting", "value", "reason"], [[key, c.value, c.reason] for key, c in choices.items()])
    return 0


def _resolve(name: str):
    """The torch device; a CUDA index this machine lacks is a one-line error (not a driver traceback)."""
    import torch

    from jemlab.device import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build sees no CUDA GPU; use --device cpu")
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _preset_model(config: Any, device: Any):
    """The preset's model on `device`, as the trainer builds it (the gradient path depends on its layers)."""
    import torch

    from jemlab.data.registry import canonical_name
    from jemlab.models import build_model

    dataset = canonical_name(config.data.dataset)
    if dataset not in IMAGE_SHAPES:
        raise ConfigError(f"jemlab hardware does not know the image shape of dataset {dataset!r}")
    image_shape, num_classes = IMAGE_SHAPES[dataset]
    m = config.model
    model = build_model(m.name, image_shape, num_classes, m.energy_head, m.options).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _capability_rows(device: Any) -> list[list[str]]:
    from jemlab.accel import CAPABILITIES, probe

    found = probe(device)
    return [[name, "ok" if found[name].ok else "no", found[name].reason] for name in CAPABILITIES]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns; the last one (the reason) is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip())
