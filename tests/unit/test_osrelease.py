"""os-release(5) parsing: quoting and escapes like a shell, but nothing evaluated."""

from __future__ import annotations

from pytest_kvm.osrelease import parse_os_release

DEBIAN_12 = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://example.org/"
"""


def test_debian_file():
    facts = parse_os_release(DEBIAN_12)
    assert facts["ID"] == "debian"
    assert facts["VERSION_ID"] == "12"
    assert facts["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert facts["VERSION_CODENAME"] == "bookworm"
    assert facts["HOME_URL"] == "https://example.org/"


def test_quotes_and_escapes():
    text = r"""
# a comment
   # an indented comment
SINGLE='it is $HOME and \n literally'
DOUBLE="say \"hi\" for \$5, a \\ and a \`tick\` but \n stays"
BARE=a\ b
MIXED="a"'b'c
EMPTY=
EMPTY_QUOTED=""
ID_LIKE="ubuntu debian"
"""
    facts = parse_os_release(text)
    assert facts["SINGLE"] == r"it is $HOME and \n literally"
    assert facts["DOUBLE"] == r'say "hi" for $5, a \ and a `tick` but \n stays'
    assert facts["BARE"] == "a b"
    assert facts["MIXED"] == "abc"
    assert facts["EMPTY"] == ""
    assert facts["EMPTY_QUOTED"] == ""
    assert facts["ID_LIKE"].split() == ["ubuntu", "debian"]
    assert not any(key.startswith("#") for key in facts)


def test_nothing_is_evaluated():
    facts = parse_os_release('A="$(touch /tmp/pwned)"\nB=`id`\nC=${HOME}\n')
    assert facts == {"A": "$(touch /tmp/pwned)", "B": "`id`", "C": "${HOME}"}


def test_bad_lines_are_ignored_and_last_value_wins():
    text = "not a line\n=nokey\n1BAD=x\nGOOD-NAME=x\nID=first\nID=second\nNAME='unterminated\n"
    assert parse_os_release(text) == {"ID": "second", "NAME": "unterminated"}


def test_windows_line_endings_and_spaces_around():
    assert parse_os_release('ID=debian\r\n  VERSION_ID = "12"  \r\n') == {
        "ID": "debian",
        "VERSION_ID": "12",
    }
