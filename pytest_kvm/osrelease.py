"""Parse os-release(5) files (``/etc/os-release``) without a shell.

The format is a shell-compatible list of ``KEY=VALUE`` assignments, one per line.
Values may be unquoted, in single quotes (taken literally) or in double quotes, in
which a backslash escapes ``"``, ``\\``, ``$`` and a backtick (before any other
character it is kept). Outside quotes a backslash escapes the next character.
Lines that are empty, start with ``#`` or do not assign a valid name are ignored,
as systemd does; nothing is ever expanded or evaluated.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOUBLE_QUOTE_ESCAPES = frozenset('"\\$`')


def parse_os_release(text: str) -> dict[str, str]:
    """``{"ID": "debian", "VERSION_ID": "12", ...}`` from an os-release file's text.

    A key given twice keeps its last value, as a shell would."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            continue
        result[key] = _unquote(value.strip())
    return result


def _unquote(value: str) -> str:
    """A value's text: quoted and unquoted parts joined, quotes and escapes removed.

    An unterminated quote runs to the end of the line."""
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        char = value[i]
        if char == "'":
            end = value.find("'", i + 1)
            end = n if end < 0 else end
            out.append(value[i + 1 : end])
            i = end + 1
        elif char == '"':
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n and value[i + 1] in _DOUBLE_QUOTE_ESCAPES:
                    out.append(value[i + 1])
                    i += 2
                else:
                    out.append(value[i])
                    i += 1
            i += 1  # the closing quote
        elif char == "\\" and i + 1 < n:
            out.append(value[i + 1])
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)
