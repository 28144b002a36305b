"""What the tests share: a fake machine, machine specs, image, hash and process helpers,
and a small HTTP image server. Test modules import from here, never from each other or
from a conftest (which holds fixtures only)."""
