"""Build the API reference (HTML) from the docstrings with pdoc, and fail on what pdoc lets pass silently.

    python scripts/build_api_docs.py [--out docs/api]

pdoc documents the names ``jemlab`` exports (``load``, ``train``, ``Model``, ...; its ``__all__``). It warns
about modules it cannot import and docstrings it cannot process, but a cross-reference it cannot resolve stays
plain code without a word. This script fails (exit status 1, one line per problem) on both: every warning pdoc
emits, and every inline code span in the rendered pages that names a dotted identifier rooted at ``jemlab`` or at
a documented class (``Model.sampel``, ``jemlab.lod``) but links nowhere. Mention lower-level modules in prose, not
as code, or document them. The HTML is a build product: docs/api/ is not committed.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import warnings
from pathlib import Path

MODULES = ("jemlab",)  # the public API; its __all__ limits pdoc to the names `import jemlab` exports
# Inline code that reads as a dotted reference: `jemlab.load`, `Model.sample`, `Model.sample()`.
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?$")
# An inline code span with nothing inside but text: a link (<a ...>) or highlighting would show as a tag.
PLAIN_CODE = re.compile(r"<code>([^<]*)</code>")


def build(out: Path, modules: tuple[str, ...] = MODULES) -> list[str]:
    """Render the API reference into `out` and return its problems (an empty list when it is clean).

    Args:
        out: the output folder (created).
        modules: the modules to document (tests pass a deliberately broken one).

    Returns:
        One line per pdoc warning and per unresolved cross-reference.
    """
    import pdoc
    import pdoc.doc
    import pdoc.render

    pdoc.render.configure(docformat="google", show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=out)
        # Classes: a dotted name rooted at a function is no reference (`train.minutes` is a config key).
        classes = {
            name
            for module in modules
            for name, member in pdoc.doc.Module.from_name(module).members.items()
            if isinstance(member, pdoc.doc.Class)
        }
    problems = [f"pdoc warning: {' '.join(str(w.message).split())}" for w in caught]
    roots = {*modules, *classes}
    for page in sorted(out.rglob("*.html")):
        for match in PLAIN_CODE.finditer(page.read_text(encoding="utf-8")):
            text = html.unescape(match.group(1))
            if DOTTED.match(text) and text.split(".")[0] in roots:
                problems.append(f"{page.relative_to(out)}: unresolved reference `{text}`")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/api"), help="output folder (default: %(default)s)")
    args = parser.parse_args()
    problems = build(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in the API reference", file=sys.stderr)
        return 1
    print(f"API reference: {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
