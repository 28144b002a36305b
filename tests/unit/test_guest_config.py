from pathlib import Path

import pytest

from pytest_kvm.accel import AccelChoice
from pytest_kvm.config import NetworkSpec
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.guest import Guest, GuestConfig, template_refusal
from pytest_kvm.images import Image
from pytest_kvm.run import RunContext


@pytest.fixture
def run():
    context = RunContext(AccelChoice("tcg", "test"))
    yield context
    context.close()


IMAGE = Image("img", Path("/nonexistent.qcow2"), "qcow2", "img")


@pytest.mark.parametrize("name", ["web-1", "db", "a.example.org", "x" * 63])
def test_good_hostnames(run, name):
    Guest(run, GuestConfig(image=IMAGE, hostname=name))


@pytest.mark.parametrize(
    "name", ["", "-web", "web-", "a b", "a\nb", "a;reboot", "x" * 64, "a..b", "ünï"]
)
def test_bad_hostnames_are_refused_before_anything_starts(run, name):
    with pytest.raises(KvmConfigError, match="is not a host name"):
        Guest(run, GuestConfig(image=IMAGE, hostname=name))


def test_kernel_args_without_boot_files_is_refused(run):
    with pytest.raises(KvmConfigError, match="boot files"):
        Guest(run, GuestConfig(image=IMAGE, kernel_args="quiet"))


def test_a_plain_guest_may_be_restored_from_a_template():
    assert GuestConfig(image=IMAGE).restore_refusal() == ""
    # --kvm-vnc guests come from a template with a display.
    assert GuestConfig(image=IMAGE, vnc=True, memory=2048, cpus=1).restore_refusal() == ""
    # libvirt guests too (libvirt save images, restoreFlags).
    assert GuestConfig(image=IMAGE, backend="libvirt").restore_refusal() == ""
    # A bridge guest too: each clone takes its own MAC and DHCP lease.
    assert GuestConfig(image=IMAGE, network=NetworkSpec("bridge", "br0")).restore_refusal() == ""


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"cdrom": Path("/media.iso")}, "need a real boot"),
        ({"boot": "cdrom"}, "need a real boot"),
        ({"ssh": False}, "need a real boot"),
        ({"disk_size": "20G"}, "need a real boot"),
        ({"kernel_args": "quiet"}, "need a real boot"),
        ({"kernel": Path("/vmlinuz")}, "need a real boot"),
        ({"installed": True}, "need a real boot"),
        ({"display": True}, "need a real boot"),
        ({"blank": True}, "need a real boot"),
        ({"network": NetworkSpec("libvirt", "default")}, "guests boot for real"),
        (
            {"image": Image("enc", Path("/e.qcow2"), "qcow2", "enc", encrypted=(True,))},
            "encrypted images boot for real",
        ),
    ],
)
def test_what_needs_a_real_boot_says_why(changes, why):
    assert why in GuestConfig(**{"image": IMAGE, **changes}).restore_refusal()


class ShapedTemplate:
    """What Guest reads of a template before anything starts."""

    shape = type("Shape", (), {"display": False, "tpm": False})()
    vlan_macs: tuple[str, ...] = ()
    mac = "52:54:00:12:34:56"
    client_key = None
    agent = True


def test_guest_refuses_a_template_for_a_config_the_rule_refuses(run):
    template = ShapedTemplate()
    Guest(run, GuestConfig(image=IMAGE), template=template)  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="need a real boot"):
        Guest(run, GuestConfig(image=IMAGE, ssh=False), template=template)  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="no display"):
        Guest(run, GuestConfig(image=IMAGE, vnc=True), template=template)  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="no TPM"):
        Guest(run, GuestConfig(image=IMAGE, tpm=True), template=template)  # type: ignore[arg-type]


def test_a_bridge_clone_needs_the_template_agent(run):
    """Without qemu-ga nothing reaches a bridge clone before it has its own address."""
    bridge = GuestConfig(image=IMAGE, network=NetworkSpec("bridge", "br0"))
    Guest(run, bridge, template=ShapedTemplate())  # type: ignore[arg-type]
    no_agent = ShapedTemplate()
    no_agent.agent = False
    assert "qemu-ga did not answer" in template_refusal(bridge, no_agent)  # type: ignore[arg-type]
    assert template_refusal(GuestConfig(image=IMAGE), no_agent) == ""  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="boots for real"):
        Guest(run, bridge, template=no_agent)  # type: ignore[arg-type]
