"""The guest: a ``Guest`` facade over small parts (see guest.py). What other modules
and tests import from ``pytest_kvm.guest`` is re-exported here."""

from .commands import CommandResult, Commands
from .config import (
    DEFAULT_BLANK_DISK,
    MIN_BLANK_DISK,
    BootPlan,
    GuestConfig,
    SavedGuest,
    parse_size,
    template_refusal,
)
from .guest import Guest

__all__ = [
    "DEFAULT_BLANK_DISK",
    "MIN_BLANK_DISK",
    "BootPlan",
    "CommandResult",
    "Commands",
    "Guest",
    "GuestConfig",
    "SavedGuest",
    "parse_size",
    "template_refusal",
]
