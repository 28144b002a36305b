"""Shared host folders (share=) on restored guests: the host's files read in the guest,
a read-only share refuses writes, a rw one's writes appear on the host."""

from __future__ import annotations

import pytest

from pytest_kvm.share import Share

pytestmark = pytest.mark.integration


def test_share_read_only_and_rw_on_a_restored_clone(kvm_guest_factory, tmp_path):
    data, out = tmp_path / "data dir", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    (data / "from host.txt").write_text("written on the host\n")
    g = kvm_guest_factory(share={data: "/mnt/the data", out: Share("/mnt/out", rw=True)})
    assert g.template is not None  # restored, the default path: devices came after
    assert g.succeed("cat '/mnt/the data/from host.txt'") == "written on the host\n"
    # Read-only: neither a new file nor a change reaches the host folder.
    g.fail("touch '/mnt/the data/new'")
    g.fail("echo x >> '/mnt/the data/from host.txt'")
    assert sorted(p.name for p in data.iterdir()) == ["from host.txt"]
    # rw=True: what the guest writes is on the host.
    g.succeed("echo written in the guest > /mnt/out/from-guest.txt && sync")
    assert (out / "from-guest.txt").read_text() == "written in the guest\n"
    # ... and what the host writes later is seen in the guest.
    (out / "later.txt").write_text("later\n")
    assert g.succeed("cat /mnt/out/later.txt") == "later\n"
