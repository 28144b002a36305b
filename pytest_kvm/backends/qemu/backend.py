"""The qemu backend's per-run object: QEMU started directly on this host."""

from __future__ import annotations

from collections.abc import Callable

from ..base import Backend, Labels, MachineSpec
from .machine import QemuMachine


class QemuBackend(Backend):
    """QEMU started directly on this host: nothing to check or hold per run."""

    name = "qemu"

    def machine(
        self,
        spec: MachineSpec,
        *,
        on_spawn: Callable[[int], None] | None = None,
        labels: Labels = (),
    ) -> QemuMachine:
        return QemuMachine(spec, on_spawn=on_spawn)


BACKEND = QemuBackend
