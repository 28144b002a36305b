from pathlib import Path

import pytest

from pytest_kvm.accel import AccelChoice
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.guest import Guest, GuestConfig
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
