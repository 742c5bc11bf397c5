"""MkDocs hook: render the site's TeX to MathML at build time, so math shows with no
script and no network access.

``pymdownx.arithmatex`` (``generic: true``) turns ``$...$`` and ``$$...$$`` in the
Markdown pages and in the docstrings mkdocstrings renders into
``<span class="arithmatex">\\(...\\)</span>`` and ``<div class="arithmatex">\\[...\\]</div>``.
This hook replaces each of them with the MathML that latex2mathml (a pure-Python
package from the ``docs`` extra) produces; browsers render MathML natively. A formula
latex2mathml cannot convert, or whose output still holds a TeX command, is logged as a
warning, which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\(?P<open>[(\[])(?P<tex>.*?)\\[)\]]\s*</(?P=tag)>',
    re.DOTALL,
)
# latex2mathml reads a size command (\big, \Bigl, ...) followed by a delimiter command
# as the command's name (it prints "\|"); the delimiter characters themselves work.
_SIZED_DELIMITER = re.compile(r"(\\[bB]igg?[lrm]?)\s*\\(\||[lr]?Vert|[lr]?vert|langle|rangle)")
_DELIMITER_CHAR = {
    "|": "‖",
    "Vert": "‖",
    "lVert": "‖",
    "rVert": "‖",
    "vert": "|",
    "lvert": "|",
    "rvert": "|",
    "langle": "⟨",
    "rangle": "⟩",
}
# Inside \text{...}, "\_" is an underscore, which latex2mathml prints as "\_".
_TEXT = re.compile(r"\\text\{([^{}]*)\}")
_TAG = re.compile(r"<[^>]+>")


def tex_to_mathml(tex: str, *, display: bool = False) -> str:
    """The MathML of one TeX formula (without its ``$`` delimiters).

    Raises:
        ValueError: latex2mathml failed, or left a TeX command in its output.
    """
    source = _SIZED_DELIMITER.sub(lambda m: m[1] + _DELIMITER_CHAR[m[2]], tex)
    source = _TEXT.sub(lambda m: r"\text{" + m[1].replace(r"\_", "_") + "}", source)
    try:
        mathml = convert(source, display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises several exception types
        raise ValueError(f"latex2mathml cannot convert {tex!r}: {error}") from error
    text = html.unescape(_TAG.sub("", mathml))
    if "\\" in text:
        raise ValueError(f"latex2mathml left a TeX command in {tex!r}: {text.strip()!r}")
    return mathml


def on_page_content(html_text: str, page, config, files) -> str:
    """Replace every arithmatex formula of the page by its MathML."""

    def render(match: re.Match[str]) -> str:
        tex = html.unescape(match["tex"])
        display = match["open"] == "["
        try:
            mathml = tex_to_mathml(tex, display=display)
        except ValueError as error:
            log.warning("%s: %s", page.file.src_uri, error)
            return match[0]
        return f'<{match["tag"]} class="math">{mathml}</{match["tag"]}>'

    return _ARITHMATEX.sub(render, html_text)
