import json
import stat

from pytest_kvm.seed import SeedConfig, read_seed, write_seed
from pytest_kvm.ssh import KeyPair


def test_seed_carries_key_host_key_and_hostname(tmp_path):
    client = KeyPair.generate("client")
    host = KeyPair.generate("host")
    config = SeedConfig("i-1", "web'1;rm -rf", client.public_openssh,
                        host.private_openssh, host.public_openssh)  # fmt: skip
    path = write_seed(config, tmp_path / "seed.iso")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    files = read_seed(path)
    assert files["user-data"].startswith("#cloud-config\n")
    doc = json.loads(files["user-data"].split("\n", 1)[1])
    assert doc["ssh_authorized_keys"] == [client.public_openssh]
    assert doc["ssh_keys"]["ed25519_private"] == host.private_openssh
    assert doc["disable_root"] is False
    # Not ssh_pwauth: cloud-init would restart sshd after it first answered.
    assert "ssh_pwauth" not in doc
    (drop_in,) = doc["write_files"]
    assert drop_in["path"] == "/etc/ssh/sshd_config.d/10-pytest-kvm.conf"
    assert "PasswordAuthentication no" in drop_in["content"]
    assert doc["hostname"] == "web'1;rm -rf"  # carried as data, never through a shell
    assert json.loads(files["meta-data"])["instance-id"] == "i-1"


def test_seed_volume_label_is_cidata(tmp_path):
    client = KeyPair.generate()
    path = write_seed(SeedConfig("i", "h", client.public_openssh, "x", "y"), tmp_path / "s.iso")
    assert path.read_bytes()[0x8000 + 40 : 0x8000 + 46] == b"cidata"


def test_keys_are_private_and_distinct(tmp_path):
    a = KeyPair.generate().save(tmp_path / "a")
    b = KeyPair.generate()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    assert a.public_openssh != b.public_openssh
    assert a.public_openssh.startswith("ssh-ed25519 ")
    assert a.pkey().get_name() == "ssh-ed25519"


def test_seed_without_hostname_keeps_the_systems(tmp_path):
    """An installed disk keeps the host name its installer set."""
    client = KeyPair.generate()
    files = read_seed(write_seed(SeedConfig("i", None, client.public_openssh, "x", "y"),
                                 tmp_path / "s.iso"))  # fmt: skip
    doc = json.loads(files["user-data"].split("\n", 1)[1])
    assert doc["preserve_hostname"] is True and "hostname" not in doc
    assert json.loads(files["meta-data"]) == {"instance-id": "i"}
    named = read_seed(write_seed(SeedConfig("i", "h", client.public_openssh, "x", "y"),
                                 tmp_path / "n.iso"))  # fmt: skip
    assert json.loads(named["user-data"].split("\n", 1)[1])["preserve_hostname"] is False
