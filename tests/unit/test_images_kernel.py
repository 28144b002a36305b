import pytest

from pytest_kvm.errors import ImageError
from pytest_kvm.images.kernel import parse_grub_cfg

DEBIAN_CLOUD = """
set default=0
menuentry 'Debian GNU/Linux' --class debian {
	insmod ext2
	linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=1234 ro console=tty0 console=ttyS0,115200
	initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
}
menuentry 'recovery' {
	linux	/boot/vmlinuz-6.1.0-27-cloud-amd64 root=UUID=1234 ro single
	initrd	/boot/initrd.img-6.1.0-27-cloud-amd64
}
"""


def test_first_entry_of_a_debian_grub_cfg():
    kernel, initrd, cmdline = parse_grub_cfg(DEBIAN_CLOUD)
    assert kernel == "/boot/vmlinuz-6.1.0-28-cloud-amd64"
    assert initrd == "/boot/initrd.img-6.1.0-28-cloud-amd64"
    assert cmdline == "root=UUID=1234 ro console=tty0 console=ttyS0,115200"


def test_linux16_and_no_initrd():
    kernel, initrd, cmdline = parse_grub_cfg(
        "menuentry x {\n  linux16 /vmlinuz root=/dev/vda1\n}\n"
    )
    assert (kernel, initrd, cmdline) == ("/vmlinuz", None, "root=/dev/vda1")


def test_no_linux_line_is_an_image_error():
    with pytest.raises(ImageError, match="no 'linux' line"):
        parse_grub_cfg("set default=0\n")
