"""What is known of an image file without booting it (today: whether it runs
cloud-init), recorded next to it by a catalog build or in the cache after one look,
and valid while the file's identity (size, mtime, inode) is unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path


def facts_path(image_path: Path) -> Path:
    """Where the catalog build records what it knows of an image, next to it."""
    return image_path.with_name(image_path.name + ".facts.json")


def _file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def write_facts(image_path: Path, cloud_init: bool, record: Path | None = None) -> None:
    record = record or facts_path(image_path)
    doc = {"file": _file_identity(image_path), "cloud_init": cloud_init}
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, record)


def read_facts(image_path: Path, record: Path) -> bool | None:
    try:
        doc = json.loads(record.read_text())
        if doc["file"] == _file_identity(image_path):
            return bool(doc["cloud_init"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None
