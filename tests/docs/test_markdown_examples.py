"""Every ```python block of README.md and docs/*.md runs, and prints what the text shows.

The convention the documentation follows (and this test enforces):

- A fence whose language is ``python`` is run. The blocks of one file run in order in
  one namespace, so a later block uses the names an earlier one defined; each file
  starts from a fresh namespace.
- A block that prints is followed by its output, in a fence opened with
  ```` ```text title="Output" ```` (only blank lines between the two). The output is
  compared with what the block printed, as doctest compares (``ELLIPSIS``): ``...``
  stands for any text, e.g. a timing; trailing spaces and blank lines are ignored.
  A block that prints without such a fence fails, and so does an output fence that
  does not follow a ```python block.
- Blocks that are not meant to run name another language: ``bash`` for shell
  commands, ``text`` for tables, pseudo-code and logs. A fence without a language
  fails (it would be run by no one and checked by nothing).

Each block is compiled under a file name of its own, registered in ``linecache`` and
padded so that its line numbers are those of the Markdown file: tracebacks point at the
Markdown, and lipnets' tracer can read the source of a ``forward`` defined in a block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import linecache
import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
OUTPUT_INFO = 'text title="Output"'

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: its info string, its body and the lines (1-based) of its opening
    and closing fences."""

    info: str
    body: str
    opening: int
    closing: int

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""


@dataclasses.dataclass(frozen=True)
class Example:
    """A ```python block and the output the text shows for it (None: it shows none)."""

    code: Block
    output: Block | None


def fenced_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order (indented fences included, as in
    admonitions)."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        end = i + 1
        while end < len(lines) and not _closes(lines[end], ticks):
            end += 1
        if end == len(lines):
            raise AssertionError(f"line {i + 1}: the fence {ticks} is never closed")
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        found.append(Block(match["info"].strip(), "\n".join(body), i + 1, end + 1))
        i = end + 1
    return found


def _closes(line: str, ticks: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(ticks) and set(stripped) == {ticks[0]}


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def examples(path: Path) -> list[Example]:
    """The ```python blocks of a Markdown file with their output blocks, checking the
    convention of this module."""
    lines = path.read_text(encoding="utf-8").splitlines()
    result: list[Example] = []
    previous: Block | None = None
    for block in fenced_blocks("\n".join(lines)):
        where = f"{_name(path)}:{block.opening}"
        if not block.language:
            raise AssertionError(f"{where}: a fence without a language (python, bash, text?)")
        if block.info == OUTPUT_INFO:
            follows = (
                previous is not None
                and previous.language == "python"
                and all(not s.strip() for s in lines[previous.closing : block.opening - 1])
            )
            if not follows:
                raise AssertionError(
                    f"{where}: an output block that does not follow a python block"
                )
            result[-1] = Example(result[-1].code, block)
        elif block.language == "python":
            result.append(Example(block, None))
        previous = block
    return result


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def _run(path: Path, block: Block, namespace: dict) -> str:
    """Run one block in ``namespace`` and return what it printed."""
    filename = f"<{_name(path)}, block at line {block.opening}>"
    source = "\n" * block.opening + block.body + "\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, filename, "exec"), namespace)
    return printed.getvalue()


@pytest.fixture
def isolated_torch():
    """The blocks run with one torch thread; they may seed torch, set its thread count or
    its default dtype, and none of it leaks into the rest of the suite."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    # One thread: the outputs shown were printed with one, and on a shared 2-core machine
    # two threads make the estimators' small products many times slower.
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def check_markdown(path: Path) -> int:
    """Run the ```python blocks of one Markdown file in order and compare what each prints
    with the output the text shows; return how many outputs were compared."""
    namespace: dict = {"__name__": "__main__"}
    checker = doctest.OutputChecker()
    compared = 0
    for example in examples(path):
        where = f"{_name(path)}:{example.code.opening}"
        printed = _run(path, example.code, namespace)
        if example.output is None:
            assert not printed, (
                f"{where}: the block prints, but no ```{OUTPUT_INFO} block follows it; "
                f"it printed:\n{printed}"
            )
            continue
        want, got = _normalise(example.output.body), _normalise(printed)
        if not checker.check_output(want, got, doctest.ELLIPSIS):
            raise AssertionError(
                f"{where}: the block printed something else than the text shows\n"
                + checker.output_difference(doctest.Example("", want), got, doctest.ELLIPSIS)
            )
        compared += 1
    return compared


@pytest.mark.parametrize("path", MARKDOWN, ids=[_name(p) for p in MARKDOWN])
@pytest.mark.usefixtures("isolated_torch")
def test_markdown_examples_run_and_print_what_the_text_shows(path: Path):
    check_markdown(path)


def test_the_markdown_has_examples_to_run():
    """The collector finds the blocks: a parsing bug that found none would pass above."""
    counts = {p.relative_to(ROOT).as_posix(): len(examples(p)) for p in MARKDOWN}
    assert counts["README.md"] >= 3
    assert sum(counts.values()) >= 20, counts
    shown = sum(e.output is not None for p in MARKDOWN for e in examples(p))
    assert shown >= 10


def test_the_collector_pairs_outputs_and_refuses_what_breaks_the_convention(tmp_path: Path):
    path = tmp_path / "probe.md"
    good = (
        "text\n\n```python\nprint(1)\n```\n\n"
        '```text title="Output"\n1\n```\n\n```bash\nls\n```\n\n'
        "!!! note\n    ````python\n    x = '```'\n    ````\n"
    )
    path.write_text(good, encoding="utf-8")
    found = examples(path)
    assert [(e.code.body, e.output and e.output.body) for e in found] == [
        ("print(1)", "1"),
        ("x = '```'", None),
    ]
    assert found[0].code.opening == 3 and found[0].output.opening == 7
    for bad in (
        "```\nno language\n```\n",
        '```text title="Output"\n1\n```\n',
        '```python\nx = 1\n```\n\nprose\n\n```text title="Output"\n1\n```\n',
        '```python\nx = 1\n```\n```bash\nls\n```\n```text title="Output"\n1\n```\n',
        "```python\nx = 1\n",
    ):
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(AssertionError):
            examples(path)


def test_a_wrong_or_missing_output_fails_and_an_ellipsis_matches(tmp_path: Path):
    path = tmp_path / "probe.md"
    code = "```python\nimport math\n```\n\n```python\nprint(math.sqrt(2), 'in 1.25 s')\n```\n\n"
    shown = '```text title="Output"\n{}\n```\n'
    path.write_text(code + shown.format("1.4142135623730951 in ... s"), encoding="utf-8")
    assert check_markdown(path) == 1  # the second block reads the first one's import
    for wrong in ("1.4142135623730951 in 1.26 s", "1.41421356237309 in ... s", ""):
        path.write_text(code + shown.format(wrong), encoding="utf-8")
        with pytest.raises(AssertionError, match="printed something else"):
            check_markdown(path)
    path.write_text(code, encoding="utf-8")
    with pytest.raises(AssertionError, match="no ```text"):
        check_markdown(path)


def test_a_failing_block_fails_with_the_markdown_line(tmp_path: Path):
    path = tmp_path / "probe.md"
    path.write_text("Text.\n\n```python\ndef f():\n    raise KeyError(1)\n\n\nf()\n```\n")
    with pytest.raises(KeyError) as error:
        check_markdown(path)
    assert error.traceback[-1].lineno + 1 == 5  # pytest counts lines from 0
