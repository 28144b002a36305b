"""request.py: the factory's arguments validated in one place; the one restore rule
(GuestConfig.restore_refusal) as the session asks it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_kvm.config import NetworkSpec, Settings
from pytest_kvm.customize import Customization
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.guest import GuestConfig
from pytest_kvm.images import Image
from pytest_kvm.request import GuestRequest, SpecChecks
from pytest_kvm.vlan import Vlan

WHERE = "t.py::test_x: kvm_guest_factory"
IMAGE = Image("img", Path("/nonexistent.qcow2"), "qcow2", "img")


def test_defaults_make_a_plain_request() -> None:
    request = GuestRequest.build(WHERE)
    assert request.image is None and request.vlans == () and request.customize is None
    assert not request.blank


def test_positional_image_is_image() -> None:
    assert GuestRequest.build(WHERE, "debian-12").image == "debian-12"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"disk": "/x", "image": "debian-12"}, "disk= boots that disk; image= is not needed"),
        ({"disk": "/nonexistent/disk.qcow2"}, "does not exist"),
        ({"kernel": "/nonexistent/vmlinuz"}, "kernel='/nonexistent/vmlinuz' does not exist"),
        ({"append": 3}, "append= takes the kernel command line as a string"),
        ({"customize": {"user": "x"}}, "customize= takes files, hostname, run; not user"),
        ({"customize": 3}, "customize= takes a Customization or a dict"),
        ({"vlan": ["not a vlan"]}, "is not a kvm_vlan segment"),
    ],
)
def test_bad_arguments_name_the_test(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(KvmConfigError) as info:
        GuestRequest.build(WHERE, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    if "kernel" not in kwargs:
        assert str(info.value).startswith(WHERE)


def test_network_vlan_is_a_vlan(tmp_path: Path) -> None:
    vlan = Vlan("vlan1", tmp_path / "vlan1")
    request = GuestRequest.build(WHERE, network=vlan)  # type: ignore[arg-type]
    assert request.network is None and request.vlans == (vlan,)
    with pytest.raises(KvmConfigError, match="pass every kvm_vlan segment as vlan="):
        GuestRequest.build(WHERE, network=vlan, vlan=vlan)  # type: ignore[arg-type]


def test_blank_for_installers(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    assert GuestRequest.build(WHERE, boot="cdrom").blank
    assert GuestRequest.build(WHERE, kernel=kernel).blank


def test_customize_goes_on_top_of_the_marker() -> None:
    settings = Settings(customize=Customization(hostname="marker"))
    assert GuestRequest.build(WHERE).customization(settings).hostname == "marker"
    request = GuestRequest.build(WHERE, customize={"hostname": "call"})
    assert request.customization(settings).hostname == "call"


def test_shaped_validates_memory() -> None:
    assert GuestRequest.build(WHERE, memory=2048).shaped(Settings()).memory == 2048
    with pytest.raises(KvmConfigError, match="memory="):
        GuestRequest.build(WHERE, memory=-1).shaped(Settings())


def test_spec_checks_once_and_say_where(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("pytest_kvm.request.check_spec", calls.append)
    specs = SpecChecks()
    specs.check("debian-12", "command line --kvm-image")
    specs.check("debian-12")
    assert calls == ["debian-12"]


def test_spec_checks_say_where() -> None:
    with pytest.raises(KvmConfigError, match=r"^here: image 'Debian 12'"):
        SpecChecks().check("Debian 12", "here")


def test_restore_refusal() -> None:
    may = GuestConfig(image=IMAGE, snapshot=True)
    assert may.restore_refusal() == ""
    refused = [
        dataclasses.replace(may, cdrom=Path("/x.iso")),
        dataclasses.replace(may, ssh=False),
        dataclasses.replace(may, disk_size="8G"),
        dataclasses.replace(may, kernel_args="quiet"),
        dataclasses.replace(may, installed=True),
        dataclasses.replace(may, display=True),
        dataclasses.replace(may, network=NetworkSpec("libvirt", "default")),
        dataclasses.replace(may, image=dataclasses.replace(IMAGE, encrypted=(True,))),
    ]
    for config in refused:
        assert config.restore_refusal(), config
    assert dataclasses.replace(may, backend="libvirt").restore_refusal() == ""


def test_a_call_that_does_not_fit_names_the_factory() -> None:
    from pytest_kvm.request import FACTORY_SIGNATURE, check_factory_call

    with pytest.raises(TypeError, match=r"^kvm_guest_factory\(\): .*'memroy'"):
        check_factory_call((), {"memroy": 512})
    with pytest.raises(TypeError, match=r"^kvm_guest_factory\(\): "):
        check_factory_call(tuple(range(30)), {})
    check_factory_call(("debian-12",), {"memory": 512, "display": True})
    assert list(FACTORY_SIGNATURE.parameters)[:3] == ["image", "network", "memory"]
