"""Counts the real boots of a test run: a pytest plugin, opt-in, for measuring what the
test command costs (bench/RESULTS.md, "Real boots of the test command").

    mkdir -p /tmp/bc && ln -sf "$PWD/tests/support/bootcount.py" /tmp/bc/kvm_bootcount.py
    PYTEST_KVM_BOOTLOG=/tmp/boots.jsonl PYTHONPATH=/tmp/bc PYTEST_PLUGINS=kvm_bootcount \\
        .venv/bin/pytest tests/integration/test_guest.py --kvm-image debian-12-minimal
    .venv/bin/python tests/support/bootcount.py /tmp/boots.jsonl

The plugin is loaded by its own name from a directory of its own, not as
``tests.support``, so that inner runs (pytester subprocesses, which keep
PYTEST_PLUGINS and PYTHONPATH; pytester drops PYTEST_ADDOPTS) load it too without
seeing the checkout; their boots are charged to the outer test that started them.
One JSON line per event:

- ``boot``: a real boot (``RealBoot.start``): a template's build (``template``) or a
  guest that is not restored (``cold``, with the reason the factory gave);
- ``reboot``: ``Guest.reboot()``, a new boot of a running guest;
- ``template``: a template asked for (``TemplateStore.obtain``), under its cache root:
  on a fresh machine each distinct (root, name) is built once, whatever this
  machine's cache already holds. Names with ``@`` are prepared snapshots, built by
  restoring their base and running ``setup``, not by a boot.

Nothing here changes what a test does; the wrappers call the real methods."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "PYTEST_KVM_BOOTLOG"
# The outer test that started this (inner) run, if any: set before this run's own tests
# overwrite PYTEST_CURRENT_TEST.
_PARENT = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
_lock = threading.Lock()


def _record(event: dict[str, object]) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    event = {"pid": os.getpid(), "parent": _PARENT, "test": current, **event}
    with _lock, open(path, "a") as out:
        out.write(json.dumps(event, default=str) + "\n")


def _config_facts(config: Any) -> dict[str, object]:
    return {
        "image": config.image.name,
        "memory": config.memory,
        "cpus": config.cpus,
        "network": str(config.network),
        "firmware": config.firmware,
        "tpm": config.tpm,
        "backend": config.backend,
        "blank": config.blank,
        "installed": config.installed,
        "display": config.display or config.vnc,
        "snapshot": config.snapshot,
        "refusal": config.restore_refusal() if config.snapshot else "snapshot off",
    }


def _install() -> None:
    from pytest_kvm.guest.boot import RealBoot
    from pytest_kvm.guest.guest import Guest
    from pytest_kvm.template import TemplateStore

    if getattr(RealBoot.start, "_counted", False):
        return

    def counted(original: Callable[..., Any], event: Callable[..., dict[str, object]]) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            _record(event(self, *args, **kwargs))
            return original(self, *args, **kwargs)

        wrapper._counted = True  # type: ignore[attr-defined]
        return wrapper

    def boot(self: Any) -> dict[str, object]:
        kind = "template" if self._plan is not None else "cold"
        return {"event": "boot", "kind": kind, **_config_facts(self._config)}

    def reboot(self: Any, *args: Any, **kwargs: Any) -> dict[str, object]:
        return {"event": "reboot", "guest": self.name, **_config_facts(self.config)}

    def obtain(self: Any, name: str, key: str, *args: Any, **kwargs: Any) -> dict[str, object]:
        return {"event": "template", "root": str(self.root), "name": name}

    RealBoot.start = counted(RealBoot.start, boot)  # type: ignore[method-assign]
    Guest.reboot = counted(Guest.reboot, reboot)  # type: ignore[method-assign]
    TemplateStore.obtain = counted(TemplateStore.obtain, obtain)  # type: ignore[method-assign]


def pytest_configure(config: object) -> None:
    if os.environ.get(ENV):
        _install()


def summarize(path: Path) -> str:
    """Per outer test file: real boots on a fresh machine (cold boots, reboots, distinct
    templates, each built once) and the prepared snapshots."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_file: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    # The run's cache is the one most templates were asked for under; inner runs with
    # a --kvm-cache of their own (a tmp_path) build their templates again.
    roots = Counter(e["root"] for e in events if e["event"] == "template")
    run_root = roots.most_common(1)[0][0] if roots else ""
    for e in events:
        owner = e["parent"] or e["test"]
        where = owner.split("::", 1)[0] or "(session)"
        test = owner.split("::", 1)[-1]
        if e["event"] == "boot" and e["kind"] == "cold":
            per_file[where]["cold"] += 1
            why = "installer" if e["blank"] else e["refusal"] or "?"
            reasons[where].append(f"cold  {test}: {e['memory']}M/{e['cpus']}cpu {why}")
        elif e["event"] == "reboot":
            per_file[where]["reboot"] += 1
            reasons[where].append(f"reboot {test}")
        elif e["event"] == "template" and (e["root"], e["name"]) not in seen:
            seen.add((e["root"], e["name"]))
            kind = "snapshot" if "@" in e["name"] else "template"
            per_file[where][kind] += 1
            private = "" if e["root"] == run_root else " (a private cache)"
            reasons[where].append(f"{kind:8} {test}: {e['name'].rsplit('-', 1)[0]}{private}")
    lines = []
    total: Counter[str] = Counter()
    for where in sorted(per_file):
        c = per_file[where]
        total += c
        boots = c["cold"] + c["reboot"] + c["template"]
        lines.append(
            f"{where}: {boots} real boots (template {c['template']}, cold {c['cold']}, "
            f"reboot {c['reboot']}); snapshot builds {c['snapshot']}"
        )
        lines.extend(f"    {r}" for r in reasons[where])
    boots = total["cold"] + total["reboot"] + total["template"]
    lines.append(
        f"total: {boots} real boots (template {total['template']}, cold {total['cold']}, "
        f"reboot {total['reboot']}); snapshot builds {total['snapshot']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
