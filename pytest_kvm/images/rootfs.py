"""The configure phase of an image build: the files pytest-kvm writes into the
bootstrapped root file system (hostname, fstab, cloud-init, network, grub.cfg),
units enabled and disabled, and apt's caches removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ImageError
from .hybrid import esp_fstab_line
from .recipe import Recipe

Progress = Callable[[str], None]
Run = Callable[[Sequence[str]], str]

# The line of cloud-init's configuration that says who configures the network.
_NETWORK_COMMENT = {
    "networkd": "# systemd-networkd's 10-dhcp.network configures the network.\n",
    "ifupdown": "# ifupdown (/etc/network/interfaces, DHCP on eth0) configures the network.\n",
}


#: The serial console's device per architecture (QEMU's q35/pc, arm and riscv virt).
SERIAL_CONSOLES = {"amd64": "ttyS0", "arm64": "ttyAMA0", "riscv64": "ttyS0"}


def kernel_command_line(recipe: Recipe, root_uuid: str) -> str:
    """The guest kernel's command line, as written to ``grub.cfg``.

    ``no_timer_check``: the kernel's early check that the timer interrupt arrives
    through the IO-APIC gives up after a few jiffies of busy-waiting; under TCG on a
    loaded host it can time out, and the kernel panics at 0.05 s ("IO-APIC + timer
    doesn't work!", seen here at load 19). Cloud images for virtual machines turn the
    check off the same way (it is x86's: other architectures' lines leave it out)."""
    if recipe.architecture != "amd64":
        console = SERIAL_CONSOLES[recipe.architecture]
        base = [f"root=UUID={root_uuid}", "ro", "console=tty0", f"console={console},115200n8"]
        return " ".join([*base, *recipe.kernel_args])
    base = [
        f"root=UUID={root_uuid}",
        "ro",
        "console=tty0",
        "console=ttyS0,115200n8",
        "no_timer_check",
    ]
    return " ".join([*base, *recipe.kernel_args])


class RootConfig:
    """The configuration of one bootstrapped root directory; :meth:`configure` writes it."""

    def __init__(
        self,
        recipe: Recipe,
        root: Path,
        root_uuid: str,
        chroot: str,
        run: Run,
        progress: Progress,
        systemctl: Sequence[str] | None = None,
    ) -> None:
        """``systemctl``: the command that enables units in ``root``; by default
        the image's own systemctl in a chroot (a foreign image's cannot run here:
        its builder passes the host's ``systemctl --root=ROOT``)."""
        self.recipe = recipe
        self.systemctl = (
            list(systemctl) if systemctl is not None else [chroot, str(root), "systemctl"]
        )
        self.root = root
        self.root_uuid = root_uuid
        self.chroot = chroot
        self._run = run
        self.progress = progress

    def configure(self) -> None:
        root = self.root
        recipe = self.recipe
        kernel = self._find_boot_files()

        write_file(root / "etc/hostname", f"{recipe.hostname}\n")
        write_file(
            root / "etc/hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.hostname}\n\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        )
        write_file(
            root / "etc/fstab",
            "# Written by pytest-kvm's image builder.\n"
            f"UUID={self.root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n"
            + esp_fstab_line(self.root_uuid),
        )
        # the ESP's mount point: grub-install, update-grub and shim's updates in a
        # guest find the ESP there, under any firmware, like on an installed system
        (root / "boot/efi").mkdir(mode=0o755, parents=True, exist_ok=True)
        # Empty: systemd makes a new one on each guest's first boot.
        write_file(root / "etc/machine-id", "", mode=0o444)
        unlink_quietly(root / "var/lib/dbus/machine-id")
        if (root / "var/lib/dbus").is_dir():
            (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
        # cloud-init writes host keys per guest (from the seed, or generated).
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        write_file(root / "etc/default/locale", "LANG=C.UTF-8\n")
        self._lock_root_password()
        self._configure_resolv_conf()

        write_file(
            root / "etc/cloud/cloud.cfg.d/90-pytest-kvm.cfg",
            "# Written by pytest-kvm's image builder.\n"
            "# Only the NoCloud seed (a cidata CD or disk) configures guests;\n"
            "# nothing probes for cloud metadata services.\n"
            "datasource_list: [ NoCloud, None ]\n"
            + _NETWORK_COMMENT[recipe.network]
            + "network: {config: disabled}\n"
            "# RSA host key generation takes seconds under TCG; these take\n"
            "# milliseconds. A seed can still supply its own ssh_keys.\n"
            "ssh_genkeytypes: [ed25519, ecdsa]\n"
            "# C.UTF-8 is built in: no locale generation at boot.\n"
            "locale: C.UTF-8\n"
            "# No GRUB package in the image for it to configure.\n"
            "grub_dpkg: {enabled: false}\n",
        )
        if recipe.network == "ifupdown":
            self._configure_ifupdown()
        else:
            self._configure_networkd()
        self._configure_units()

        cmdline = kernel_command_line(recipe, self.root_uuid)
        # x86: GRUB's own serial terminal. Under UEFI elsewhere, the firmware's
        # console is already the serial port (and the signed arm64 GRUB has no
        # serial module).
        terminal = (
            "serial --unit=0 --speed=115200\n"
            "terminal_input serial console\n"
            "terminal_output serial\n"
            if recipe.architecture == "amd64"
            else ""
        )
        write_file(
            root / "boot/grub/grub.cfg",
            "# Written by pytest-kvm's image builder.\n" + terminal + "set default=0\n"
            "set timeout=0\n"
            f"menuentry '{recipe.description or recipe.name}' {{\n"
            f"\techo 'GRUB: loading {kernel[0]}'\n"
            f"\tlinux {kernel[0]} {cmdline}\n"
            f"\techo 'GRUB: loading {kernel[1]}'\n"
            f"\tinitrd {kernel[1]}\n"
            "\techo 'GRUB: starting the kernel'\n"
            "}\n",
        )
        if recipe.architecture == "riscv64":
            # U-Boot's distro boot (OpenSBI, then U-Boot for qemu-riscv64_smode)
            # reads this from the root partition (marked bootable in the GPT)
            write_file(
                root / "boot/extlinux/extlinux.conf",
                "# Written by pytest-kvm's image builder: U-Boot's distro boot reads this.\n"
                "default debian\n"
                "timeout 0\n"
                "label debian\n"
                f"\tmenu label {recipe.description or recipe.name}\n"
                f"\tlinux {kernel[0]}\n"
                f"\tinitrd {kernel[1]}\n"
                f"\tappend {cmdline}\n",
            )
        self.progress(f"configure: kernel command line: {cmdline}")
        self._clean()

    def _configure_networkd(self) -> None:
        root = self.root
        write_file(
            root / "etc/systemd/network/10-dhcp.network",
            "# Written by pytest-kvm's image builder.\n"
            "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
            "# A test reaches a bridge guest at its DHCP address: never drop it while\n"
            "# the DHCP client stops, restarts or renews (it is re-acquired in place).\n"
            "KeepConfiguration=dhcp\n",
        )
        wait_online = self._guest_path("lib/systemd/systemd-networkd-wait-online")
        write_file(
            root / "etc/systemd/system/systemd-networkd-wait-online.service.d/pytest-kvm.conf",
            "# Written by pytest-kvm's image builder: one link is enough,\n"
            "# and never stall the boot for long.\n"
            f"[Service]\nExecStart=\nExecStart={wait_online} --any --timeout=20\n",
        )

    def _configure_ifupdown(self) -> None:
        """DHCP on eth0 (the recipe has net.ifnames=0) by ifupdown's networking
        script: for images without systemd. ``auto``, not ``allow-hotplug``: the
        boot waits for the lease, so sshd starts with the network up."""
        self._guest_path("sbin/ifup")  # the recipe must install ifupdown
        write_file(
            self.root / "etc/network/interfaces",
            "# Written by pytest-kvm's image builder.\n"
            "source /etc/network/interfaces.d/*\n\n"
            "auto lo\niface lo inet loopback\n\n"
            "auto eth0\niface eth0 inet dhcp\n",
        )

    def _guest_path(self, relative: str) -> str:
        """``/usr/lib/...`` or ``/lib/...``, whichever the guest has as a real file."""
        for candidate in (f"usr/{relative}", relative):
            if (self.root / candidate).exists():
                return f"/{candidate}"
        raise ImageError(f"building {self.recipe.name!r}: /{relative} not found in the image")

    def _find_boot_files(self) -> tuple[str, str]:
        """The kernel and initramfs paths for grub.cfg (Debian's /vmlinuz symlinks;
        riscv64's kernel is an uncompressed /vmlinux)."""
        root = self.root
        kernel_link = "vmlinux" if self.recipe.architecture == "riscv64" else "vmlinuz"
        kernels = sorted((root / "boot").glob(f"{kernel_link}-*"))
        if not kernels:
            raise ImageError(
                f"building {self.recipe.name!r}: no kernel in /boot; the recipe's "
                "packages must include a linux-image-* package"
            )
        for link, pattern in ((kernel_link, f"{kernel_link}-*"), ("initrd.img", "initrd.img-*")):
            target = root / link
            if target.is_symlink():
                # resolve inside the image, not on the build host
                if (root / os.readlink(target).lstrip("/")).is_file():
                    continue
            elif target.is_file():
                continue
            found = sorted((root / "boot").glob(pattern))
            if not found:
                raise ImageError(
                    f"building {self.recipe.name!r}: no /boot/{pattern} in the image "
                    "(did initramfs-tools fail?)"
                )
            unlink_quietly(target)
            target.symlink_to(f"boot/{found[-1].name}")
        return f"/{kernel_link}", "/initrd.img"

    def _lock_root_password(self) -> None:
        shadow = self.root / "etc/shadow"
        lines = shadow.read_text().splitlines()
        for i, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "root" and len(fields) > 1 and not fields[1].startswith(("!", "*")):
                fields[1] = "!" + fields[1]
                lines[i] = ":".join(fields)
        write_file(shadow, "\n".join(lines) + "\n", mode=0o640, keep_owner=True)

    def _configure_resolv_conf(self) -> None:
        root = self.root
        resolv = root / "etc/resolv.conf"
        unlink_quietly(root / "etc/.resolv.conf.systemd-resolved.bak")
        unlink_quietly(resolv)
        if (root / "usr/lib/systemd/systemd-resolved").exists() or (
            root / "lib/systemd/systemd-resolved"
        ).exists():
            resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        else:
            # never the build host's resolvers
            write_file(resolv, "")

    def _unit_exists(self, unit: str) -> bool:
        for directory in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
            if (self.root / directory / unit).exists():
                return True
        return False

    def _configure_units(self) -> None:
        systemctl = self.systemctl
        for unit in self.recipe.enable_units:
            if not self._unit_exists(unit):
                raise ImageError(
                    f"building {self.recipe.name!r}: unit {unit} to enable is not installed"
                )
        if self.recipe.enable_units:
            self._run([*systemctl, "enable", *self.recipe.enable_units])
        disable = [u for u in self.recipe.disable_units if self._unit_exists(u)]
        if disable:
            self._run([*systemctl, "disable", *disable])
        if self.recipe.mask_units:
            self._run([*systemctl, "mask", *self.recipe.mask_units])

    def _clean(self) -> None:
        root = self.root
        for pattern in (
            "var/lib/apt/lists/*_*",
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
            "var/cache/debconf/*-old",
            "var/lib/dpkg/*-old",
            "var/log/apt/*",
            "var/log/*.log",
            "var/tmp/*",
            "tmp/*",
            "root/.bash_history",
        ):
            for path in root.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_file(path: Path, text: str, *, mode: int = 0o644, keep_owner: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stat = path.stat() if keep_owner and path.exists() else None
    tmp = path.with_name(f".{path.name}.pytest-kvm")
    tmp.write_text(text)
    tmp.chmod(mode)
    if stat is not None:
        os.chown(tmp, stat.st_uid, stat.st_gid)
    os.replace(tmp, path)
