"""Backends run guests: ``qemu`` directly (default) or through libvirt.

``TABLE`` names each backend's module; it is imported only when that backend is
chosen (libvirt-python is an optional extra), and holds its ``Backend`` class as
``BACKEND``. A new backend is one package here and one line in the table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Backend

TABLE: dict[str, str] = {
    "qemu": "pytest_kvm.backends.qemu.backend",
    "libvirt": "pytest_kvm.backends.libvirt.backend",
}


def backend_class(name: str) -> type[Backend]:
    """The ``Backend`` class named ``name`` (its module imported now)."""
    try:
        module = TABLE[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(TABLE)}") from None
    cls: type[Backend] = importlib.import_module(module).BACKEND
    return cls


def load_backend(name: str, settings: Settings | None = None) -> Backend:
    """The per-run backend named ``name``, made from the run's ``settings``."""
    return backend_class(name)(settings)
