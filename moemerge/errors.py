"""The exceptions users see: a single line that says what is wrong and what to do.

Library errors name settings by their Python names (a keyword argument such as `force`, a field such as
`routing.top_k`), never by a command-line flag: the CLI spells them as its flags when it prints the line."""

from __future__ import annotations

import errno
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # a write failed for want of space or of ulimit -f


class MoemergeError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class OptionError(MoemergeError):
    """A MoemergeError that names the settings that change the outcome (`options`).

    `template` is a str.format template: a field given in `values` is text (a path, a name: its braces are
    never read as fields), every other field is an option, named in str() as itself (`{force}` -> "force");
    a front end names them its own way with `spelled` (the CLI: as its flags)."""

    def __init__(self, template: str, /, **values: object) -> None:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        self.template, self.values = template, values
        self.options = tuple(dict.fromkeys(field for field in fields if field not in values))
        super().__init__(self.spelled(str))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every option named by `spell(option)`."""
        return _WholeFieldNames().vformat(self.template, (), {**self.values, **{o: spell(o) for o in self.options}})


class _WholeFieldNames(string.Formatter):
    """Looks a field up by its whole name, so `{routing.top_k}` is an option's name, not an attribute."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, str]:
        return kwargs[field_name], field_name
