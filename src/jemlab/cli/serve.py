"""`jemlab serve`: a local demo page for one checkpoint (draw, classify, energy, SGLD refinement, chains)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jemlab.cli.arguments import nonneg_int, positive_int, say
from jemlab.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page: draw, classify, see the energy, refine with SGLD, watch chains",
        description=(
            "Serve a demo page for one checkpoint (standard-library HTTP server, no build step). The checkpoint is "
            "read once at start-up; the page never names files. Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port, 0 = any free one (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--data-dir", help="where the run's dataset lives, if not where its config says")
    p.add_argument(
        "--reference-size",
        type=nonneg_int,
        default=1000,
        help="test images scored at start-up for the OOD verdict, 0 = none (default: %(default)s, at most 10000)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from jemlab.serve.server import create_app, make_server

    if args.reference_size > 10000:
        raise ConfigError(f"--reference-size is at most 10000, got {args.reference_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    say(f"serve: loading {args.checkpoint} and scoring the reference test images ...")
    app = create_app(args.checkpoint, data_dir=args.data_dir, reference_size=args.reference_size, device=args.device)
    if app.reference_note:
        say(f"serve: {app.reference_note}")
    try:
        server = make_server(app, args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); try another --port") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"serve: warning: listening on {args.host}: anyone who can reach this address can use the page")
    say(f"serve: open {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
