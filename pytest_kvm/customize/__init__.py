"""libguestfs work on disks that are not running: customise, inject access, inspect.

Three jobs, all through libguestfs' Python binding (Debian's ``python3-guestfs``),
each in its own module (``spec`` what to change, ``source``/``handle``/``nbd`` opening a
disk):

- ``layers.customized_image``: write files, set the host name and run commands in a new
  qcow2 layer over an image, before any guest boots from it. The layer is cached
  under ``<cache>/layers/``, keyed by the base image and the customisation's
  content, so the same customisation is built once.
- ``access.inject_access``: for images without cloud-init, put the run's SSH key, the
  guest's pinned host key, its host name and a DHCP network into its overlay.
- ``reader.GuestDisk``: a stopped guest's overlay, opened read-only: files and the
  systemd journal of its last boot.

A libguestfs handle runs a small appliance VM; it takes its drives before it is
launched and none after, so one handle serves one disk (``GuestDisk`` keeps its
handle for every call). Under TCG it is forced to TCG (``force_tcg``): its own KVM
probe is wrong on these hosts and it would hang for minutes.

LUKS-encrypted qcow2 chains are exported decrypted to the appliance by
``qemu-nbd`` on a private UNIX socket, with the key read by QEMU from the secret
file: libguestfs has no way to pass a qcow2 key itself.
"""

from .access import NETWORKD_CONFIG, NETWORKD_FILE, SSHD_DROP_IN, Access, inject_access
from .handle import GUESTFS_PACKAGE, DiskHandle, guestfs_available, load_guestfs
from .layers import CUSTOMIZE_FORMAT, customized_image, layer_key, probe_cloud_init, prune_layers
from .nbd import _NbdExport
from .reader import JOURNAL_DIR, GuestDisk, _format_entry
from .source import DiskSource
from .spec import Customization, FileSpec, check_hostname

__all__ = [
    "CUSTOMIZE_FORMAT",
    "GUESTFS_PACKAGE",
    "JOURNAL_DIR",
    "NETWORKD_CONFIG",
    "NETWORKD_FILE",
    "SSHD_DROP_IN",
    "Access",
    "Customization",
    "DiskHandle",
    "DiskSource",
    "FileSpec",
    "GuestDisk",
    "_NbdExport",
    "_format_entry",
    "check_hostname",
    "customized_image",
    "guestfs_available",
    "inject_access",
    "layer_key",
    "load_guestfs",
    "probe_cloud_init",
    "prune_layers",
]
