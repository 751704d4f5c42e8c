"""What several commands share: argument types that check ranges, one-line argparse errors, the EGC flags, `say`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from jemlab.errors import ConfigError


def number(kind: type, minimum: float, inclusive: bool, what: str):
    """An argparse type: parse `kind` and check it against a lower bound, with a message naming the rule."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = number(int, 1, True, "a positive integer")
nonneg_int = number(int, 0, True, "an integer >= 0")
positive_float = number(float, 0.0, False, "a positive number")
nonneg_float = number(float, 0.0, True, "a number >= 0")


def unit_float(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def comma_list(text: str) -> list[str]:
    """``a, b,c`` → ``["a", "b", "c"]``; an empty list is an error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
    return items


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse report a bad flag in one line (its default prints the whole usage block first)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"error: {parser.prog}: {message} (see `{parser.prog} --help`)\n")

    parser.error = error  # type: ignore[method-assign]


def apply_egc_flags(args: argparse.Namespace, config: Any) -> None:
    """Apply the EGC-only flags of `sample` and `eval` to the loaded run's config (an error for JEM runs)."""
    from jemlab.config import set_value, validate_config

    names = ("sampler", "eta", "guidance", "label_guidance")
    given = {name: value for name in names if (value := getattr(args, name, None)) is not None}
    if not given:
        return
    if config.objective.name != "egc":
        flag = next(iter(given)).replace("_", "-")
        raise ConfigError(f"--{flag} applies to EGC runs only; this run's objective is jem")
    for name, value in given.items():
        set_value(config, f"egc.{name}", value)
    validate_config(config)


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for the command's JSON result)."""
    print(message, file=sys.stderr, flush=True)
