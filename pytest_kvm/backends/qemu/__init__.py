"""The qemu backend: QEMU started directly, QMP through qemu.qmp, no daemon.

``argv`` builds the command line, ``qmp`` is the QMP client thread, ``machine`` the
QemuMachine and ``backend`` the per-run QemuBackend.
"""

from .argv import QEMU_BINARY, build_argv
from .backend import BACKEND, QemuBackend
from .machine import QemuMachine
from .qmp import Qmp

_Qmp = Qmp  # its old name, which tests patch

__all__ = ["BACKEND", "QEMU_BINARY", "QemuBackend", "QemuMachine", "Qmp", "_Qmp", "build_argv"]
