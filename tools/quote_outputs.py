#!/usr/bin/env python
"""Keep the command outputs that Markdown pages quote identical to what the commands print now.

A page quotes a command's standard output between two markers, each on a line of its own::

    <!-- output of: opdf-ablate report --study configs/fashion/confirm/study.yaml --tables contrasts -->
    ...the output, byte for byte...
    <!-- end of output -->

The command is one of the console scripts of ``pyproject.toml``'s ``[project.scripts]`` (as installed). It runs in this
process, in the repository root (the paths of a study spec are relative to it), with its standard error
kept apart. Its return value must be 0 or ``None``; anything else is an error that names the page and
the command, as is an unknown program, a marker without its end, or a command that cannot be parsed.

``python tools/quote_outputs.py`` rewrites every stale block (atomically, page by page) and lists them;
``--check`` changes nothing, prints a diff of each stale block and exits 1 (``tests/test_docs.py`` runs
this check on the README and every page of ``docs/``). Without page arguments: ``README.md`` and
``docs/**/*.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.metadata
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r'^<!-- output of: (?P<command>.+?) -->\n', re.M)
END = '<!-- end of output -->\n'


class QuoteError(ValueError):
    """A quoting marker or command that cannot be honoured; the message names the page and line."""


def _programs() -> dict[str, str]:
    """The console scripts of the installed package (``[project.scripts]``): name -> ``module:function``.
    Read from its metadata, which every supported Python has (``tomllib`` only from 3.11)."""
    scripts = importlib.metadata.distribution('opdf-torchdistill').entry_points
    return {e.name: e.value for e in scripts if e.group == 'console_scripts'}


def blocks(text: str, page: str) -> list[tuple[str, int, int]]:
    """``(command, start, end)`` of each quoted block of ``text``: ``text[start:end]`` is the quoted output."""
    found = []
    position = 0
    while (match := BEGIN.search(text, position)) is not None:
        line = text.count('\n', 0, match.start()) + 1
        end = text.find(END, match.end())
        nested = BEGIN.search(text, match.end())
        if end < 0 or (nested is not None and nested.start() < end):
            raise QuoteError(f'{page}:{line}: "<!-- output of: {match["command"]} -->" has no '
                             f'"{END.strip()}" line before the next block or the end of the page')
        if end > match.end() and text[end - 1] != '\n':
            raise QuoteError(f'{page}:{line}: "{END.strip()}" must be on a line of its own')
        found.append((match['command'], match.end(), end))
        position = end + len(END)
    return found


def run(command: str, page: str = '<command>') -> str:
    """The standard output of ``command`` (a console script of this project and its arguments), run in
    this process in the repository root."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise QuoteError(f'{page}: cannot parse "{command}": {e}') from None
    programs = _programs()
    if not words or words[0] not in programs:
        raise QuoteError(f'{page}: "{command}" does not start with one of this project\'s programs '
                         f'({", ".join(sorted(programs))})')
    module, function = programs[words[0]].split(':')
    main = getattr(importlib.import_module(module), function)
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(words[1:])
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    if code not in (0, None):
        raise QuoteError(f'{page}: "{command}" exited with {code}; its standard error:\n{err.getvalue()}')
    return out.getvalue()


def refresh(path: Path, check: bool = False, stream=sys.stdout) -> int:
    """Rerun the commands quoted on the page ``path``; rewrite the stale blocks (or, with ``check``, print
    their diff). Returns the number of stale blocks."""
    page = os.path.relpath(path, ROOT)
    text = path.read_text()
    pieces, position, stale = [], 0, 0
    for command, start, end in blocks(text, page):
        now = run(command, page)
        if now and not now.endswith('\n'):
            now += '\n'
        if now != text[start:end]:
            stale += 1
            line = text.count('\n', 0, start)
            if check:
                stream.writelines(difflib.unified_diff(text[start:end].splitlines(True), now.splitlines(True),
                                                       f'{page}:{line} (quoted)', f'{command} (now)'))
            else:
                print(f'{page}:{line}: refreshed the output of {command}', file=stream)
        pieces += [text[position:start], now]
        position = end
    if stale and not check:
        new = ''.join(pieces) + text[position:]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
        try:
            with os.fdopen(fd, 'w') as f:
                f.write(new)
            os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return stale


def default_pages() -> list[Path]:
    return [ROOT / 'README.md'] + sorted((ROOT / 'docs').rglob('*.md'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('pages', nargs='*', type=Path, help='Markdown pages (default: README.md and docs/**/*.md)')
    parser.add_argument('--check', action='store_true', help='change nothing; print the diff of each stale block, '
                                                             'exit 1 if there is one')
    args = parser.parse_args(argv)
    for path in args.pages:
        if not path.is_file():
            parser.error(f'{path}: no such file')
    try:
        stale = sum(refresh(path.resolve(), args.check) for path in args.pages or default_pages())
    except QuoteError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.check and stale:
        print(f'{stale} quoted output(s) differ from what their commands print now; '
              f'`python tools/quote_outputs.py` rewrites them', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
