"""MkDocs hook: the table of lipnets' public names in the API reference, built from
``lipnets.__all__`` at build time so that it never goes stale.

A line ``<!-- lipnets members -->`` in a page becomes a table with one row per public
name (dunder names left out): a link to where the object is documented, its kind and
the first line of its docstring. The names are read statically by griffe (the library
mkdocstrings uses), so nothing is imported. A link whose target is documented nowhere
fails ``mkdocs build --strict`` (autorefs warns), and so does a name of ``__all__``
that lipnets does not define.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import griffe

log = logging.getLogger("mkdocs.hooks.api_members")

MARKER = "<!-- lipnets members -->"
_KIND_ORDER = {"function": 0, "class": 1, "module": 2, "attribute": 3}


def _first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, escaped for a
    table cell."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0].replace("|", r"\|")


def members_table(package: str, search_path: Path) -> str:
    """A Markdown table of the names in ``package.__all__``, grouped by kind."""
    root = griffe.load(package, search_paths=[str(search_path)])
    names = ast.literal_eval(str(root.members["__all__"].value))
    rows = []
    for name in names:
        if name.startswith("__"):
            continue
        member = root.members.get(name)
        if member is None:
            log.warning("%s.__all__ names %r, which %s does not define", package, name, package)
            continue
        target = member.final_target if member.is_alias else member
        summary = _first_sentence(target.docstring.value if target.docstring else "")
        kind = target.kind.value
        rows.append((_KIND_ORDER.get(kind, 9), name, kind, target.path, summary))
    lines = ["| name | kind | summary |", "|---|---|---|"]
    for _, name, kind, path, summary in sorted(rows):
        lines.append(f"| [`{name}`][{path}] | {kind} | {summary} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker line by the table of lipnets' public names."""
    if MARKER not in markdown:
        return markdown
    table = members_table("lipnets", Path(config["config_file_path"]).parent)
    return markdown.replace(MARKER, table)
