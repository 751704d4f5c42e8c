"""`jemlab presets`: each preset and the config keys it sets."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("presets", help="list the presets and what they set")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jemlab.config import PRESETS

    for name, values in PRESETS.items():
        print(f"{name}:")
        for key, value in values.items():
            print(f"    {key} = {value}")
    return 0
