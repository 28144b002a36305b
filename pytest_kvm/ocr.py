"""The text of a graphical screen by OCR: Debian's ``tesseract-ocr`` run on a picture.

Used by ``guest.screen_text()`` when the display is in a graphics mode (a framebuffer
console, an installer, a desktop), where there is no VGA text buffer to read. The
picture goes to ``tesseract stdin stdout`` on its standard input (argv list, no
shell, a timeout, one OpenMP thread: the host's cores run guests)."""

from __future__ import annotations

import os
import shutil
import subprocess

from .errors import KvmError, KvmUnavailable

TESSERACT = "tesseract"
PACKAGE = "tesseract-ocr"  # Debian's; its English model is tesseract-ocr-eng
OCR_TIMEOUT = 60.0
# --psm 6: "a single uniform block of text", what a console or an installer's dialog
# is; the default (automatic page segmentation) drops short lines of a console.
TESSERACT_ARGS = ("--psm", "6")


class OcrUnavailable(KvmUnavailable):
    """No ``tesseract`` on PATH: the message names the Debian package."""


class OcrFailed(KvmError):
    """``tesseract`` ran but failed or did not finish in time."""


def missing_tesseract() -> str:
    return (
        f"screen text of a graphical display needs OCR: no `{TESSERACT}` on PATH; "
        f"install Debian's {PACKAGE} package (apt-get install {PACKAGE})"
    )


def ocr_text(image: bytes, timeout: float = OCR_TIMEOUT) -> str:
    """The text ``tesseract`` reads in ``image`` (PNG or PPM bytes), as lines without
    trailing blanks; raises ``OcrUnavailable`` without tesseract, ``OcrFailed`` when it
    fails or runs over ``timeout`` seconds (it is killed then)."""
    exe = shutil.which(TESSERACT)
    if exe is None:
        raise OcrUnavailable(missing_tesseract())
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    try:
        done = subprocess.run(
            [exe, "stdin", "stdout", *TESSERACT_ARGS],
            input=image,
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OcrFailed(f"{TESSERACT} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise OcrFailed(f"{TESSERACT} could not run: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise OcrFailed(
            f"{TESSERACT} exited {done.returncode}: {said[-1] if said else 'no message'}"
        )
    return clean_text(done.stdout.decode(errors="replace"))


def clean_text(text: str) -> str:
    """Lines without trailing blanks, without tesseract's closing form feed and
    without blank lines at either end."""
    lines = [line.rstrip() for line in text.replace("\f", "\n").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)
