import pytest

from pytest_kvm.backends.base import Drive
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import NetworkSpec
from pytest_kvm.errors import GuestLaunchError, KvmConfigError
from tests.support.specs import opt, spec


def test_tcg_guest_argv(tmp_path):
    argv = build_argv(spec(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-accel") == ["tcg,thread=multi"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-m") == ["1024"] and opt(argv, "-smp") == ["2"]
    # SSH is forwarded on loopback only.
    assert opt(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"]
    assert "virtio-net-pci,netdev=net0,mac=02:6b:76:00:00:01" in opt(argv, "-device")
    # The console is logged from power-on; nothing waits for a client.
    serial = next(c for c in opt(argv, "-chardev") if c.startswith("socket,id=ser0"))
    assert f"logfile={tmp_path / 'serial.log'}" in serial and "wait=off" in serial
    drives = opt(argv, "-drive")
    assert drives[0].startswith(f"file={tmp_path / 'disk.qcow2'},format=qcow2")
    assert "readonly=on" in drives[1]
    assert "virtio-blk-pci,drive=drive0,bootindex=1" in opt(argv, "-device")


def test_kvm_uses_host_cpu(tmp_path):
    argv = build_argv(spec(tmp_path, accel="kvm"))
    assert opt(argv, "-accel") == ["kvm"] and opt(argv, "-cpu") == ["host"]


def test_cdrom_boot(tmp_path):
    drives = (Drive(tmp_path / "d.qcow2"), Drive(tmp_path / "inst.iso", "raw", media="cdrom"))
    argv = build_argv(spec(tmp_path, drives=drives, boot="cdrom"))
    assert opt(argv, "-boot") == ["order=d"]
    assert any(d.endswith("media=cdrom,readonly=on") for d in opt(argv, "-drive"))
    # what OVMF (UEFI) boots first: it does not read -boot order
    assert "ide-cd,drive=drive1,bus=ide.1,bootindex=0" in opt(argv, "-device")


def test_comma_in_path_is_refused(tmp_path):
    bad = tmp_path / "a,b"
    with pytest.raises(GuestLaunchError, match="comma"):
        build_argv(spec(tmp_path, drives=(Drive(bad / "disk.qcow2"),)))


def test_bridge_without_tap_or_helper_is_refused(tmp_path):
    with pytest.raises(KvmConfigError, match="bridge=br0: no tap device and no helper"):
        build_argv(spec(tmp_path, network=NetworkSpec("bridge", "br0")))


def test_template_and_clone_argv_differ_only_where_they_must(tmp_path):
    ram = tmp_path / "ram"
    template = build_argv(spec(tmp_path, ram_file=ram, ram_shared=True))
    clone = build_argv(spec(tmp_path, ram_file=ram, ram_shared=False, incoming=tmp_path / "state"))
    # RAM is the file: shared while the template runs, private copy-on-write in clones.
    assert f"memory-backend-file,id=ram0,size=1024M,mem-path={ram},share=on" in opt(
        template, "-object"
    )
    assert f"memory-backend-file,id=ram0,size=1024M,mem-path={ram},share=off" in opt(
        clone, "-object"
    )
    assert "memory-backend=ram0" in opt(clone, "-machine")
    # The clone waits for its state over QMP; the template does not.
    assert opt(clone, "-incoming") == ["defer"] and opt(template, "-incoming") == []
    # Every machine gets a fresh VM generation ID, so restored guests reseed.
    assert "vmgenid,guid=auto" in opt(template, "-device")
    # Same devices in the same order, or the saved state would not load.
    assert opt(template, "-device") == opt(clone, "-device")


def test_plain_boot_has_no_ram_file(tmp_path):
    argv = build_argv(spec(tmp_path))
    assert opt(argv, "-object") == [] and opt(argv, "-incoming") == []
    assert opt(argv, "-machine") == ["q35"]


def test_ram_file_with_comma_is_refused(tmp_path):
    with pytest.raises(GuestLaunchError, match="comma"):
        build_argv(spec(tmp_path, ram_file=tmp_path / "a,b"))


def test_direct_kernel_boot_argv(tmp_path):
    argv = build_argv(
        spec(
            tmp_path,
            kernel=tmp_path / "vmlinuz",
            initrd=tmp_path / "initrd.img",
            append="root=UUID=abc ro console=ttyS0 quiet",
        )
    )
    assert opt(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert opt(argv, "-initrd") == [str(tmp_path / "initrd.img")]
    # One argv element: no shell, so spaces need no quoting.
    assert opt(argv, "-append") == ["root=UUID=abc ro console=ttyS0 quiet"]


def test_bridge_tap_and_vlan_nics(tmp_path):
    from pytest_kvm.backends.base import Nic

    nics = (
        Nic("vlan0", "dgram,id=vlan0,local.type=unix,local.path=/r/a,remote.type=unix,"
                     "remote.path=/r/s", "02:6b:76:00:00:02"),
        Nic("vlan1", "hubport,id=vlan1,hubid=2", "02:6b:76:00:00:03"),
    )  # fmt: skip
    argv = build_argv(spec(tmp_path, network=NetworkSpec("bridge", "br0"), tap_fd=9, nics=nics))
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=9,vhost=off", nics[0].netdev, nics[1].netdev]
    devices = opt(argv, "-device")
    nic_devices = [d for d in devices if d.startswith("virtio-net-pci")]
    # Primary first, then the vlan NICs in order: a clone's devices match its template's.
    assert nic_devices == [
        "virtio-net-pci,netdev=net0,mac=02:6b:76:00:00:01",
        "virtio-net-pci,netdev=vlan0,mac=02:6b:76:00:00:02",
        "virtio-net-pci,netdev=vlan1,mac=02:6b:76:00:00:03",
    ]


def test_display_and_vnc(tmp_path):
    plain = build_argv(spec(tmp_path))
    # Every guest has a graphics card (screenshots in failure artifacts); no VNC.
    assert "VGA" in opt(plain, "-device") and "-vnc" not in plain
    assert plain == build_argv(spec(tmp_path, display=True))
    shown = build_argv(spec(tmp_path, display=True))
    assert "VGA" in opt(shown, "-device") and "-vnc" not in shown
    watched = build_argv(spec(tmp_path, vnc=True))
    assert "VGA" in opt(watched, "-device")
    # Loopback only, a free display found by QEMU, and a password (set over QMP).
    assert opt(watched, "-vnc") == ["127.0.0.1:0,to=99,password=on"]
