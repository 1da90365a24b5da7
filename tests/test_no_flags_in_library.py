"""Library code names settings by their Python names; only moemerge/cli.py speaks in --flags (it words the
library's errors as flags). Every string literal in moemerge/ outside cli.py is scanned for flag-looking text:
messages, the parts of f-strings, docstrings."""

from __future__ import annotations

import ast
import re

from support.paths import ROOT

PACKAGE = ROOT / "moemerge"
FLAG = re.compile(r"--[a-z][a-z-]+")
# Flag-looking text that is not a flag: (file under moemerge/, the text) -> why.
NOT_FLAGS = {
    ("hub/ids.py", "--org--name"): "the Hub cache's folder name for org/name is models--org--name",
}


def flags_in(source: str) -> list[tuple[int, str]]:
    """(line, text) of every flag-looking piece of a string literal in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, text) for text in FLAG.findall(node.value)]
    return found


def library_flags() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name != "cli.py":
            for line, text in flags_in(path.read_text(encoding="utf-8")):
                found.setdefault((name, text), []).append(line)
    return found


def test_library_strings_name_no_flags():
    found = library_flags()
    assert found, "the scan found nothing at all, not even the allowed texts: is the package where it should be?"
    named = sorted(f"moemerge/{name}:{found[name, text][0]}: {text}" for name, text in set(found) - set(NOT_FLAGS))
    assert not named, f"name the option (e.g. allow_pickle); the CLI words it as a flag: {named}"
    assert set(NOT_FLAGS) <= set(found), "an allowed text is gone: remove it from NOT_FLAGS"


def test_the_scan_reads_messages_f_strings_and_docstrings():
    source = '''
"""Module text: `--deep` reads more."""
def f(device):
    """Refuse an OUT without --force."""
    raise ValueError(f"--device {device!r}: use auto, cpu or cuda; " "or pass --allow-pickle")
# a comment with --not-scanned
x = "-- not a flag, nor is -1 or a--b"
'''
    assert flags_in(source) == [(2, "--deep"), (4, "--force"), (5, "--device"), (5, "--allow-pickle")]
