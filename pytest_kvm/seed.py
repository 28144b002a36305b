"""cloud-init NoCloud seed: an ISO 9660 volume labelled ``cidata``, built with pycdlib."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pycdlib


@dataclass(frozen=True)
class SeedConfig:
    """What goes into a guest's seed."""

    instance_id: str
    # None: keep the host name the system has (a disk an installer wrote).
    hostname: str | None
    authorized_key: str  # the run's public key, OpenSSH format
    host_key_private: str  # ed25519 host key the guest must use (OpenSSH PEM)
    host_key_public: str

    def user_data(self) -> str:
        # JSON is valid YAML: no quoting mistakes whatever the values contain.
        doc = {
            "disable_root": False,
            # Password log-ins off through a drop-in written before sshd starts, not
            # ssh_pwauth: that edits sshd_config later and restarts sshd while
            # tests may already be connecting (they were refused).
            "write_files": [
                {
                    "path": "/etc/ssh/sshd_config.d/10-pytest-kvm.conf",
                    "permissions": "0644",
                    "content": "PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                }
            ],
            "ssh_authorized_keys": [self.authorized_key],
            "ssh_deletekeys": True,
            "ssh_genkeytypes": [],
            "ssh_keys": {
                "ed25519_private": self.host_key_private,
                "ed25519_public": self.host_key_public,
            },
            "preserve_hostname": self.hostname is None,
            # Generating locales takes seconds under TCG and fails on minimal images.
            "locale": False,
        }
        if self.hostname is not None:
            doc["hostname"] = self.hostname
        return "#cloud-config\n" + json.dumps(doc, indent=1) + "\n"

    def meta_data(self) -> str:
        meta = {"instance-id": self.instance_id}
        if self.hostname is not None:
            meta["local-hostname"] = self.hostname
        return json.dumps(meta) + "\n"


def write_seed(config: SeedConfig, path: Path) -> Path:
    """Write the NoCloud ISO to ``path``, readable only by this user."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in (("user-data", config.user_data()), ("meta-data", config.meta_data())):
        data = text.encode()
        iso_name = "/" + name.upper().replace("-", "_") + ".;1"
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            iso_name,
            rr_name=name,
            joliet_path="/" + name,
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        iso.write_fp(out)
    iso.close()
    return path


def read_seed(path: Path) -> dict[str, str]:
    """The files of a seed ISO by their Rock Ridge names (for tests and debugging)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        files: dict[str, str] = {}
        for name in ("user-data", "meta-data"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            files[name] = buf.getvalue().decode()
        return files
    finally:
        iso.close()
