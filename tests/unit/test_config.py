from pathlib import Path

import pytest

from pytest_kvm.config import Settings, parse_network, resolve
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.network import NetworkSpec


def ini_from(values):
    return lambda key: values.get(key)


def test_defaults_when_nothing_given():
    s = resolve({}, {}, ini_from({}))
    assert s.memory == 1024 and s.cpus == 2 and s.backend == "qemu"
    assert s.network == NetworkSpec("user")
    assert s.images == ()


def test_precedence_cli_over_env_over_ini():
    ini = ini_from({"kvm_memory": "512", "kvm_cpus": "3", "kvm_accel": "kvm"})
    env = {"PYTEST_KVM_MEMORY": "768", "PYTEST_KVM_CPUS": "4"}
    s = resolve({"memory": "2048"}, env, ini)
    assert s.memory == 2048  # command line
    assert s.cpus == 4  # environment beats ini
    assert s.accel == "kvm"  # ini beats default


def test_marker_beats_command_line():
    s = resolve({"memory": "2048"}, {}, ini_from({}))
    assert s.with_marker({"memory": 512}, "t").memory == 512


@pytest.mark.parametrize(
    ("cli", "needle"),
    [
        ({"memory": "lots"}, "command line --kvm-memory: 'lots' is not a whole number"),
        ({"cpus": "0"}, "out of range"),
        ({"accel": "hvf"}, "is not one of auto, kvm, tcg"),
        ({"network": "bridge="}, "is not a bridge name"),
        ({"network": "wifi"}, "is not a network spec"),
        ({"boot_timeout": "-3"}, "out of range"),
    ],
)
def test_bad_values_name_value_and_source(cli, needle):
    with pytest.raises(KvmConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve(cli, {}, ini_from({}))


def test_bad_env_value_names_the_variable():
    with pytest.raises(KvmConfigError, match="environment PYTEST_KVM_CPUS"):
        resolve({}, {"PYTEST_KVM_CPUS": "two"}, ini_from({}))


def test_images_from_env_and_ini():
    assert resolve({}, {"PYTEST_KVM_IMAGE": "a.qcow2,debian-12"}, ini_from({})).images == (
        "a.qcow2",
        "debian-12",
    )
    assert resolve({}, {}, ini_from({"kvm_image": ["debian-12"]})).images == ("debian-12",)


def test_unknown_marker_key():
    with pytest.raises(KvmConfigError, match="unknown argument memroy="):
        Settings().with_marker({"memroy": 1}, "test_x")


def test_network_specs():
    assert parse_network("bridge=br0", "x") == NetworkSpec("bridge", "br0")
    assert parse_network("libvirt=default", "x") == NetworkSpec("libvirt", "default")
    helper = "/usr/lib/qemu/qemu-bridge-helper"
    assert parse_network("bridge=br0,helper", "x") == NetworkSpec("bridge", "br0", helper)
    assert parse_network("bridge=br0,helper=/opt/h", "x") == NetworkSpec("bridge", "br0", "/opt/h")
    assert str(NetworkSpec("bridge", "br0", "/opt/h")) == "bridge=br0,helper=/opt/h"
    for bad, says in (
        ("bridge", "not a network spec"),
        ("bridge=a b", "is not a bridge name"),
        ("bridge=a/b", "is not a bridge name"),
        ("tap=x", "not a network spec"),
        ("bridge=" + "x" * 20, "is not a bridge name"),
        ("bridge=br0,helper=rel/path", "helper=/ABSOLUTE/PATH"),
        ("bridge=br0,vhost", "helper=/ABSOLUTE/PATH"),
        ("libvirt=default,x", "not a network spec"),
    ):
        with pytest.raises(KvmConfigError, match=says):
            parse_network(bad, "x")


def test_cache_and_artifacts_are_paths(tmp_path: Path):
    s = resolve({"cache": str(tmp_path / "c"), "artifacts": "~/arts"}, {}, ini_from({}))
    assert s.cache == tmp_path / "c"
    assert s.artifacts == Path.home() / "arts"


def test_libvirt_uris_repeat_and_workers_take_turns():
    uris = ["qemu:///system", "qemu+ssh://root@hv1/system", "qemu+ssh://root@hv2/system"]
    s = resolve({"uri": uris}, {"PYTEST_XDIST_WORKER": "gw4"}, lambda key: None)
    assert s.uris == tuple(uris)
    assert s.uri == uris[1]  # gw4: 4 mod 3
    s = resolve({"uri": uris}, {}, lambda key: None)
    assert s.uri == uris[0]  # no xdist: the first
    env = {"PYTEST_KVM_URI": "qemu:///system  qemu+ssh://hv/system", "PYTEST_XDIST_WORKER": "gw1"}
    assert resolve({}, env, lambda key: None).uri == "qemu+ssh://hv/system"
    with pytest.raises(KvmConfigError, match="command line --kvm-uri: 'hv1' is not a libvirt URI"):
        resolve({"uri": ["hv1"]}, {}, lambda key: None)


def test_vnc_from_command_line_env_and_marker():
    assert resolve({}, {}, ini_from({})).vnc is False
    assert resolve({"vnc": True}, {}, ini_from({})).vnc is True
    assert resolve({}, {"PYTEST_KVM_VNC": "1"}, ini_from({})).vnc is True
    assert resolve({}, {}, ini_from({})).with_marker({"vnc": True}, "t").vnc is True
    with pytest.raises(KvmConfigError, match="PYTEST_KVM_VNC: 'maybe' is not a boolean"):
        resolve({}, {"PYTEST_KVM_VNC": "maybe"}, ini_from({}))
