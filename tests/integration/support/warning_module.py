"""A kernel module that warns when it is loaded, built on the host for a guest's kernel:
the real thing for the error gate's ``oops`` kind (``WARNING: CPU: ... at ...``), which
no userspace action can make a Debian kernel print on purpose.

The guest's kernel headers come from the host's apt (its configured sources), as the
images' packages do: ``linux-headers-RELEASE``, its ``-common`` half and the
``linux-kbuild`` tools, unpacked into a directory (nothing is installed on the host),
built with the host's gcc (Debian 12's gcc-12, the compiler the kernel was built with).
Copied into inner runs (``pytester.copy_example``) and imported there by name.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

SOURCE = r"""
#include <linux/module.h>
#include <linux/bug.h>

static int __init pkvm_warns_init(void)
{
	WARN(1, "pytest-kvm: a module that warns\n");
	return 0;
}

static void __exit pkvm_warns_exit(void) {}

module_init(pkvm_warns_init);
module_exit(pkvm_warns_exit);
MODULE_LICENSE("GPL");
"""

_RELEASE = re.compile(r"^(\d+\.\d+)\.\d+-\d+-[a-z0-9]+$")  # 6.1.0-50-amd64


def _host(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def build_warning_module(release: str, workdir: Path) -> Path:
    """``pkvm_warns.ko`` for the kernel ``release`` (a guest's ``uname -r``)."""
    match = _RELEASE.match(release)
    if not match:
        raise ValueError(f"not a Debian kernel release: {release!r}")
    flavourless = release.rsplit("-", 1)[0]  # 6.1.0-50
    debs = workdir / "debs"
    root = workdir / "root"
    module = workdir / "module"
    for path in (debs, root, module):
        path.mkdir(parents=True)
    packages = [f"linux-headers-{release}", f"linux-headers-{flavourless}-common",
                f"linux-kbuild-{match.group(1)}"]  # fmt: skip
    _host(["apt-get", "-q", "download", *packages], debs)
    for deb in sorted(debs.glob("*.deb")):
        _host(["dpkg-deb", "-x", str(deb), str(root)], workdir)
    headers = root / "usr" / "src" / f"linux-headers-{release}"
    # Its Makefile includes the -common half by its installed (absolute) path.
    makefile = headers / "Makefile"
    makefile.write_text(makefile.read_text().replace("/usr/src/", f"{root}/usr/src/"))
    (module / "pkvm_warns.c").write_text(SOURCE)
    (module / "Kbuild").write_text("obj-m := pkvm_warns.o\n")
    _host(["make", "-s", "-C", str(headers), f"M={module}", "modules"], workdir)
    return module / "pkvm_warns.ko"
