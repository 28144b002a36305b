"""What a test asks for: the ``@pytest.mark.kvm`` marker's and ``kvm_guest_factory``'s
arguments, validated here, in one place, before any image is resolved or guest started."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import arch as arches
from . import firmware
from .config import CUSTOMIZE_KEYS, Settings
from .customize import Customization
from .errors import ImageError, KvmConfigError
from .imagearch import image_arch
from .images import Image
from .images.efi import signed_boot_refusal
from .images.store import check_spec
from .media import check_boot_file
from .share import Share, SharedDir, merge_shares, parse_shares
from .snapshot import Snapshot
from .vlan import Vlan

# The fixtures that make a test parametrized over the images.
GUEST_FIXTURES = ("kvm_guest", "kvm_guest_factory", "kvm_image")


def marker_settings(node: Any, base: Settings) -> Settings:
    """``base`` with the node's ``@pytest.mark.kvm`` markers applied and validated."""
    settings = base
    # Farthest first, so the closest marker (function over class over module) wins.
    for marker in reversed(list(node.iter_markers("kvm"))):
        if marker.args:
            raise KvmConfigError(f"{node.nodeid}: @pytest.mark.kvm takes keyword arguments only")
        kwargs = marker.kwargs
        snapshot = kwargs.get("image")
        if isinstance(snapshot, Snapshot):  # see marker_snapshot
            kwargs = {k: v for k, v in kwargs.items() if k != "image"}
            if isinstance(snapshot.base_image, str):  # it pins an image: the matrix is that
                kwargs["image"] = snapshot.base_image
        settings = settings.with_marker(kwargs, node.nodeid)
    return settings


def marker_snapshot(node: Any) -> Snapshot | None:
    """The prepared snapshot that the closest ``@pytest.mark.kvm(image=...)`` names,
    if it names one: the factory's default image then (the image matrix stays)."""
    for marker in node.iter_markers("kvm"):
        if "image" in marker.kwargs:
            image = marker.kwargs["image"]
            return image if isinstance(image, Snapshot) else None
    return None


class SpecChecks:
    """``check_spec`` on each image value the run is given (``--kvm-image``, the
    marker's ``image=``, the factory's ``image=``), once per value: a value checked
    once is not checked again where it comes back."""

    def __init__(self) -> None:
        self._checked: set[str] = set()

    def check(self, spec: str, where: str | None = None) -> None:
        """A KvmConfigError (prefixed with ``where: `` when given) if ``spec`` is bad."""
        if spec in self._checked:
            return
        if where is not None:
            try:
                check_spec(spec)
            except (KvmConfigError, ImageError) as exc:  # say where the image was named
                raise KvmConfigError(f"{where}: {exc}") from None
        else:
            check_spec(spec)
        self._checked.add(spec)


@dataclass(frozen=True)
class GuestRequest:
    """One ``kvm_guest_factory(...)`` call, validated; ``where`` names the test."""

    where: str
    image: str | Image | Snapshot | None = None
    network: str | None = None
    memory: int | None = None
    cpus: int | None = None
    name: str | None = None
    cdrom: Path | None = None
    disk_size: int | str | None = None
    boot: str = "disk"
    ssh: bool = True
    hostname: str | None = None
    vlans: tuple[Vlan, ...] = ()
    # The factory's own customize= (None: not given), on top of the marker's.
    customize: Customization | None = None
    disk: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    display: bool = False
    # The factory's own share= (None: not given), on top of the marker's.
    share: tuple[SharedDir, ...] | None = None
    tpm: bool | None = None  # None: the marker's/option's
    firmware: str | None = None
    arch: str | None = None

    @classmethod
    def build(
        cls,
        where: str,
        image: str | Image | Snapshot | None = None,
        network: str | Vlan | None = None,
        memory: int | None = None,
        cpus: int | None = None,
        name: str | None = None,
        cdrom: str | os.PathLike[str] | None = None,
        disk_size: int | str | None = None,
        boot: str = "disk",
        ssh: bool = True,
        hostname: str | None = None,
        vlan: Vlan | Sequence[Vlan] | None = None,
        customize: Customization | Mapping[str, Any] | None = None,
        disk: str | os.PathLike[str] | None = None,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        append: str = "",
        display: bool = False,
        share: Mapping[str | os.PathLike[str], str | Share] | None = None,
        tpm: bool | None = None,
        firmware: str | None = None,
        arch: str | None = None,
    ) -> GuestRequest:
        """The factory's arguments (its signature), checked in the order users meet them."""
        if disk is not None and image is not None:
            raise KvmConfigError(f"{where}: disk= boots that disk; image= is not needed")
        if disk is not None and not Path(disk).is_file():
            raise KvmConfigError(f"{where}: disk={str(disk)!r} does not exist")
        kernel_path = check_boot_file(Path(kernel), "kernel") if kernel is not None else None
        initrd_path = check_boot_file(Path(initrd), "initrd") if initrd is not None else None
        if not isinstance(append, str):
            raise KvmConfigError(f"{where}: append= takes the kernel command line as a string")
        if tpm is not None and not isinstance(tpm, bool):
            raise KvmConfigError(f"{where}: tpm={tpm!r} is not True, False or None")
        custom = _customization(customize, where)
        shares = None if share is None else parse_shares(share, f"{where} share=")
        network, vlan = _vlans_given_as_network(network, vlan, where)
        vlans = (vlan,) if isinstance(vlan, Vlan) else tuple(vlan or ())
        for segment in vlans:
            if not isinstance(segment, Vlan):
                raise KvmConfigError(f"{where}: vlan={segment!r} is not a kvm_vlan segment")
        return cls(
            where=where, image=image, network=network, memory=memory, cpus=cpus, name=name,
            cdrom=Path(cdrom) if cdrom is not None else None, disk_size=disk_size,
            boot=boot, ssh=ssh, hostname=hostname, vlans=vlans, customize=custom,
            disk=Path(disk) if disk is not None else None, kernel=kernel_path,
            initrd=initrd_path, append=append, display=display, share=shares, tpm=tpm,
            firmware=firmware, arch=arch,
        )  # fmt: skip

    @property
    def blank(self) -> bool:
        """Installers start on an empty disk: from install media, or a network-boot
        style kernel, unless disk= says which disk."""
        return self.disk is None and (self.boot == "cdrom" or self.kernel is not None)

    def shaped(self, settings: Settings) -> Settings:
        """``settings`` (the marker's) with this call's memory=, cpus=, network=, tpm=,
        firmware=, arch=."""
        given = (
            ("memory", self.memory), ("cpus", self.cpus), ("network", self.network),
            ("tpm", self.tpm), ("firmware", self.firmware), ("arch", self.arch),
        )  # fmt: skip
        shaped = settings.with_marker({k: v for k, v in given if v is not None}, self.where)
        if self.firmware is not None:
            shaped = replace(shaped, firmware_source=f"{self.where} firmware=")
        if self.arch is not None:
            shaped = replace(shaped, arch_source=f"{self.where} arch=")
        return shaped

    def shares(self, settings: Settings) -> tuple[SharedDir, ...]:
        """The marker's share= with this call's on top (a guest path given in both
        is this call's)."""
        if self.share is None:
            return settings.share
        return merge_shares(settings.share, self.share, f"{self.where} share=")

    def customization(self, settings: Settings) -> Customization:
        """The marker's files=/hostname=/run=, with this call's customize= on top."""
        if self.customize is None:
            return settings.customize
        return settings.customize.merged(self.customize)


def _customization(
    customize: Customization | Mapping[str, Any] | None, where: str
) -> Customization | None:
    if customize is None or isinstance(customize, Customization):
        return customize
    if isinstance(customize, Mapping):
        unknown = set(customize) - set(CUSTOMIZE_KEYS)
        if unknown:
            raise KvmConfigError(
                f"{where}: customize= takes {', '.join(CUSTOMIZE_KEYS)}; "
                f"not {', '.join(sorted(map(str, unknown)))}"
            )
        return Customization.build(**customize, where=where)
    raise KvmConfigError(
        f"{where}: customize= takes a Customization or a dict of files=, hostname=, run="
    )


def _vlans_given_as_network(
    network: str | Vlan | None, vlan: Vlan | Sequence[Vlan] | None, where: str
) -> tuple[str | None, Vlan | Sequence[Vlan] | None]:
    """``network=kvm_vlan`` (what users try first) means ``vlan=kvm_vlan``: one more
    NIC on the segment; the primary network, which carries SSH, stays as configured."""
    if not isinstance(network, Vlan):
        return network, vlan
    if vlan is not None:
        raise KvmConfigError(
            f"{where}: network= got a kvm_vlan segment and vlan= is given too: "
            "pass every kvm_vlan segment as vlan="
        )
    return None, network


# What users see of ``kvm_guest_factory``: ``GuestRequest.build`` without ``where``.
FACTORY_SIGNATURE = inspect.signature(GuestRequest.build).replace(
    parameters=list(inspect.signature(GuestRequest.build).parameters.values())[1:],
    return_annotation="Guest",
)


def check_factory_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A call that does not fit the factory's signature is a ``TypeError`` that names
    ``kvm_guest_factory``, as Python would name a function with that signature."""
    try:
        FACTORY_SIGNATURE.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"kvm_guest_factory(): {exc}") from None


def guest_arch(settings: Settings, image: Image) -> str:
    """The architecture a guest of ``image`` is (``uname -m`` name): the image's own
    (see imagearch.py), which must be what ``--kvm-arch``/``arch=`` asks for, if it asks
    (a one-line error naming both and where the ask came from); an image of no known
    architecture is what was asked, else x86_64. Its QEMU must be installed
    (KvmUnavailable, the guest's test skips, naming the Debian package)."""
    found, how = image_arch(image, settings.cache)
    asked = settings.arch
    if asked != arches.AUTO and found is not None and found != asked:
        raise KvmConfigError(
            f"{settings.arch_source}: architecture {asked!r}, but image {image.name!r} "
            f"is {found} ({how})"
        )
    name = found or (asked if asked != arches.AUTO else "x86_64")
    arches.check_qemu(arches.get(name), f"image {image.name!r}")
    return name


def guest_firmware(settings: Settings, image: Image, arch: str = "x86_64") -> str:
    """The firmware a guest of ``image`` boots with under ``settings`` (the marker's and
    the call's): ``auto`` resolved for the guest's ``arch``, a firmware the architecture
    has not refused, ``uefi-secure`` refused for an image without a signed boot path,
    the firmware's files checked (one-line errors naming the Debian package)."""
    name = firmware.resolve(settings.firmware, arch)
    refusal = firmware.arch_refusal(name, arch)
    if refusal:
        raise KvmConfigError(
            f"{settings.firmware_source}: firmware {settings.firmware!r} for image "
            f"{image.name!r}: {refusal}"
        )
    if name == firmware.DEFAULT:
        return name
    if name == "u-boot":
        firmware.UBoot.find()
        return name
    firmware.Ovmf.find(name, arch=arch)
    if name == "uefi-secure":
        refusal = (
            "an encrypted image cannot be checked"
            if image.is_encrypted
            else signed_boot_refusal(image.path, image.format)
        )
        if refusal:
            raise KvmConfigError(
                f"{settings.firmware_source}: firmware 'uefi-secure' needs a signed boot "
                f"path, and image {image.name!r} has none ({refusal}); use firmware "
                "'uefi', or an image built since pytest-kvm made catalog images hybrid"
            )
    return name
