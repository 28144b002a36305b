"""The image matrix: guest tests parametrized over ``--kvm-image`` values, images a
test excludes (``@pytest.mark.kvm_skip_image``), xdist grouping by image
(``--kvm-dist-by-image``) and the JUnit XML properties of each test."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from .config import _bool
from .errors import KvmConfigError
from .images.store import image_name

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

    from .guest import Guest

SKIP_MARKER = "kvm_skip_image"
SKIP_MARKER_HELP = (
    "kvm_skip_image(*images, reason=): skip this test on these images (catalog names "
    "or the names test ids show), with the reason in the report"
)
DIST_OPTION = "kvm_dist_by_image"
DIST_ENV = "PYTEST_KVM_DIST_BY_IMAGE"
DIST_HELP = (
    "with xdist (-n N) and several --kvm-image: run each image's tests on one worker "
    "(at most one busy worker per image)"
)
GROUP_PREFIX = "kvm-image-"


def skipped_images(node: Any) -> list[tuple[str, str]]:
    """``(image, reason)`` for each image a ``kvm_skip_image`` marker of ``node`` (its
    function, class or module) names, the closest marker first; KvmConfigError for a
    marker used wrongly."""
    skips: list[tuple[str, str]] = []
    for marker in node.iter_markers(SKIP_MARKER):
        where = f"{node.nodeid} (@pytest.mark.{SKIP_MARKER})"
        names: Sequence[Any] = marker.args
        if len(names) == 1 and isinstance(names[0], list | tuple):
            names = names[0]
        unknown = sorted(set(marker.kwargs) - {"reason"})
        if unknown:
            raise KvmConfigError(
                f"{where}: unknown argument {unknown[0]}=; it takes image names and reason="
            )
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise KvmConfigError(
                f"{where}: {marker.args!r} names no image; give one or more image names, "
                f"e.g. @pytest.mark.{SKIP_MARKER}('debian-11', reason='no nftables')"
            )
        reason = marker.kwargs.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise KvmConfigError(
                f"{where}: reason= is required (text saying why the test skips there)"
            )
        skips += [(str(n).strip(), reason.strip()) for n in names]
    return skips


def image_params(specs: Iterable[str], skips: Sequence[tuple[str, str]]) -> list[ParameterSet]:
    """One ``pytest.param`` per image (a value given twice counts once), with the id
    ``image_name(spec)``; images that ``skips`` names carry a skip mark and its reason."""
    params = []
    for spec in dict.fromkeys(specs):
        name = image_name(spec)
        reasons = [reason for image, reason in skips if image in (spec, name)]
        marks = (
            [pytest.mark.skip(reason=f"pytest-kvm: skipped on {name}: {reasons[0]}")]
            if reasons
            else []
        )
        params.append(pytest.param(spec, id=name, marks=marks))
    return params


def dist_by_image(config: pytest.Config) -> bool:
    """``--kvm-dist-by-image``, else PYTEST_KVM_DIST_BY_IMAGE, else ini kvm_dist_by_image."""
    value: Any = config.getoption(DIST_OPTION, None)
    where = "command line --kvm-dist-by-image"
    if value is None and os.environ.get(DIST_ENV):
        value, where = os.environ[DIST_ENV], f"environment {DIST_ENV}"
    if value is None:
        ini = config.getini(DIST_OPTION)
        if ini not in (None, ""):
            value, where = ini, f"ini {DIST_OPTION}"
    return False if value is None else _bool(value, where)


def configure_dist(config: pytest.Config, images: Sequence[str]) -> str:
    """On the xdist controller, with ``--kvm-dist-by-image``: schedule each image's
    tests onto one worker (``ImageScheduling``) instead of xdist's ``load``. Returns a
    header line ("" when not distributing). With one image nothing is grouped: that
    would put every test on one worker."""
    if hasattr(config, "workerinput") or not dist_by_image(config):
        return ""
    dist = getattr(config.option, "dist", "no")
    if dist == "no" or not getattr(config.option, "numprocesses", None):
        return ""
    names = list(dict.fromkeys(image_name(spec) for spec in images))
    if len(names) < 2:
        return "pytest-kvm: --kvm-dist-by-image: one image, tests are not grouped"
    if dist != "load":
        raise KvmConfigError(
            f"--kvm-dist-by-image schedules tests by image in place of xdist's --dist load; "
            f"--dist {dist} was given"
        )
    config.pluginmanager.register(_DistController(names), "pytest-kvm-dist-by-image")
    return (
        f"pytest-kvm: --kvm-dist-by-image: each image's tests run on one worker "
        f"(at most {len(names)} workers busy)"
    )


def image_scope(nodeid: str, names: Sequence[str]) -> str:
    """The scheduling group of a test: ``kvm-image-NAME`` when its parameter id names
    one of the images ``names`` (alone or joined with other parameters' ids by "-";
    the longest name that fits wins), else the node id itself (a group of one).

    An ``@group`` suffix (xdist's ``xdist_group`` with ``--dist loadgroup``) wins."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.rsplit("@", 1)[-1]
    if not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    param_id = nodeid[nodeid.index("[", nodeid.rfind("::")) + 1 : -1]
    padded = f"-{param_id}-"
    fits = [name for name in names if f"-{name}-" in padded]
    return GROUP_PREFIX + max(fits, key=len) if fits else nodeid


class _DistController:
    """The xdist controller's scheduler: LoadScope scheduling with a scope per image."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

        names = self.names

        class ImageScheduling(LoadScopeScheduling):  # type: ignore[misc]
            """Each image's tests go to one worker, which then has its templates."""

            def _split_scope(self, nodeid: str) -> str:
                return image_scope(nodeid, names)

        return ImageScheduling(config, log)


def item_image(item: pytest.Item) -> str | None:
    """The ``--kvm-image`` value a test was parametrized with, if it was."""
    callspec = getattr(item, "callspec", None)
    spec = callspec.params.get("kvm_image") if callspec is not None else None
    return spec if isinstance(spec, str) else None


def junit_properties(item: pytest.Item, guests: Sequence[Guest]) -> list[tuple[str, str]]:
    """What ``--junitxml`` records for a test, as ``<property>`` elements: its image
    (``kvm_image``) and, per guest in start order (N = 1, 2, ...), its name
    (``kvm_guest_N``), image (``kvm_guest_N_image``) and boot phases in seconds
    (``kvm_guest_N_boot_PHASE``, ``total`` included)."""
    props: list[tuple[str, str]] = []
    spec = item_image(item)
    if spec is not None:
        props.append(("kvm_image", image_name(spec)))
    for number, guest in enumerate(guests, 1):
        props.append((f"kvm_guest_{number}", guest.name))
        props.append((f"kvm_guest_{number}_image", guest.image.name))
        for phase, seconds in guest.boot_timings.items():
            props.append((f"kvm_guest_{number}_boot_{phase}", f"{seconds:.3f}"))
    return props
