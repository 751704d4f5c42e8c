"""Evaluation reports: ``metrics.json``, a self-contained ``report.html`` and ``report.md``.

The HTML embeds every figure as a base64 ``data:image/png`` URI and uses inline CSS only, so the
single file can be mailed or archived without its directory. The Markdown links the PNGs by relative
path. Nested metric dicts are flattened into one table per top-level section with dotted keys.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jemlab.errors import JemlabError

__all__ = [
    "flatten_metrics",
    "format_value",
    "to_jsonable",
    "write_metrics_json",
    "write_report",
]

_MAX_CELL = 300


def to_jsonable(obj: Any) -> Any:
    """Recursively convert tensors, numpy types, tuples and paths to JSON types; NaN/inf become
    ``None``.

    Args:
        obj: Nested structure of dicts/lists/scalars/arrays.

    Returns:
        A structure ``json.dumps`` accepts with ``allow_nan=False``.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def write_metrics_json(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write an already-computed nested metrics dict as pretty-printed JSON.

    Args:
        metrics: Nested dict.
        path: Output path (parents created).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    return path


def flatten_metrics(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten a nested dict into ``(dotted.key, leaf)`` rows (lists stay leaves).

    Args:
        d: Nested dict.
        prefix: Key prefix.

    Returns:
        Rows in insertion order.
    """
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            rows.extend(flatten_metrics(v, key))
        else:
            rows.append((key, v))
    return rows


def format_value(v: Any) -> str:
    """Human-readable cell text: floats with 4 significant digits, long lists truncated.

    Args:
        v: Leaf value.

    Returns:
        Text.
    """
    v = to_jsonable(v)
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, separators=(",", ":"))
        return s if len(s) <= _MAX_CELL else s[: _MAX_CELL - 1] + "…"
    return str(v)


def _sections(metrics: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    summary = [(str(k), v) for k, v in metrics.items() if not isinstance(v, Mapping)]
    out = [("summary", summary)] if summary else []
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.append((str(k), flatten_metrics(v)))
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1000px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}
h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.v{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}img{max-width:100%;border:1px solid #eee}
.notes li{margin:.2em 0}
"""


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    figures: Sequence[tuple[str, str | Path]] = (),
    notes: Sequence[str] | str = (),
    *,
    title: str = "jemlab evaluation report",
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.html`` (self-contained) and ``report.md`` into ``out_dir``.

    Args:
        out_dir: Output directory (created).
        metrics: Nested metrics dict; top-level dicts become sections, top-level scalars a "summary"
            section.
        figures: ``(title, png_path)`` pairs; PNGs are embedded in the HTML as base64 data URIs.
        notes: Protocol notes (sizes, seeds, units, caveats), one string per bullet.
        title: Report title.

    Returns:
        ``{"metrics": path, "html": path, "markdown": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes_list = [notes] if isinstance(notes, str) else list(notes)
    figs = _checked_figures(figures)
    metrics_path = write_metrics_json(metrics, out / "metrics.json")
    sections = _sections(metrics)
    html_path = out / "report.html"
    html_path.write_text(_html(title, notes_list, sections, figs), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(_markdown(title, notes_list, sections, figs, out), encoding="utf-8")
    return {"metrics": metrics_path, "html": html_path, "markdown": md_path}


def _checked_figures(figures: Sequence[tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """The ``(title, path)`` pairs with paths as ``Path``; every PNG must exist already."""
    figs: list[tuple[str, Path]] = []
    for fig_title, p in figures:
        p = Path(p)
        if not p.is_file():
            raise JemlabError(f"report figure {p} not found; write the PNG before building the report")
        figs.append((fig_title, p))
    return figs


def _html(
    title: str, notes: list[str], sections: list[tuple[str, list[tuple[str, Any]]]], figs: list[tuple[str, Path]]
) -> str:
    """The self-contained HTML page: protocol notes, one table per section, figures as base64 data URIs."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts.append('<h2>Protocol</h2><ul class="notes">')
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    for name, rows in sections:
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th>metric</th><th>value</th></tr>")
        for k, v in rows:
            parts.append(f'<tr><td>{html.escape(k)}</td><td class="v">{html.escape(format_value(v))}</td></tr>')
        parts.append("</table>")
    if figs:
        parts.append("<h2>Figures</h2>")
        for fig_title, p in figs:
            b64 = base64.b64encode(p.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(fig_title)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{html.escape(fig_title)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(
    title: str,
    notes: list[str],
    sections: list[tuple[str, list[tuple[str, Any]]]],
    figs: list[tuple[str, Path]],
    out: Path,
) -> str:
    """The Markdown report: the same content as the HTML, with the PNGs linked by path relative to ``out``."""
    md = [f"# {title}", ""]
    if notes:
        md += ["## Protocol", ""] + [f"- {n}" for n in notes] + [""]
    for name, rows in sections:
        md += [f"## {name}", "", "| metric | value |", "|---|---|"]
        md += [f"| {_md_escape(k)} | {_md_escape(format_value(v))} |" for k, v in rows]
        md.append("")
    if figs:
        md += ["## Figures", ""]
        for fig_title, p in figs:
            try:
                rel = os.path.relpath(p.resolve(), out.resolve())
            except ValueError:  # different drive on Windows
                rel = str(p.resolve())
            md += [f"![{fig_title}]({Path(rel).as_posix()})", ""]
    return "\n".join(md)
