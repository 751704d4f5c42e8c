"""Command line: parse → config → build → call. Nothing here trains, samples or scores by itself.

jemlab train  [--preset NAME] [--dataset NAME] [--minutes M] [--epochs N] --run-dir DIR [--set key=value ...]
jemlab sample --checkpoint PATH --num N [--per-class] [--steps K] --out FILE.(npz|png) [--animate FILE.gif]
jemlab eval   --checkpoint PATH [--json FILE] [--all | --parts LIST] [--report DIR] [size flags ...]
jemlab fid-ref --dataset NAME [--cache-dir DIR] [--force]
jemlab serve  --checkpoint PATH [--port P] [--host H]
jemlab presets
jemlab hardware [--device cpu|cuda|cuda:N|auto] [--preset NAME] [--json]

One module per command, each with `add_parser(sub)` (its flags, grouped, with ranges and defaults) and `run(args)`
(the command itself); `arguments` holds the argument types and helpers they share.
"""

from __future__ import annotations

import argparse
import sys

from jemlab.allocator import tune_allocator
from jemlab.cli import eval as eval_command
from jemlab.cli import fid_ref, hardware, presets, sample, serve, train
from jemlab.cli.arguments import one_line_errors
from jemlab.errors import JemlabError

# in the order `jemlab --help` lists them
COMMANDS = (train, sample, serve, eval_command, fid_ref, presets, hardware)


def build_parser() -> argparse.ArgumentParser:
    from jemlab import __version__

    parser = argparse.ArgumentParser(
        prog="jemlab", description="Joint Energy-Based Models: train, sample and evaluate."
    )
    parser.add_argument("--version", action="version", version=f"jemlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():  # every subcommand reports a bad flag in one line
        one_line_errors(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tune_allocator()  # freed tensors stay in the process: no page faults per step (jemlab/allocator.py)
        return args.func(args)
    except JemlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
