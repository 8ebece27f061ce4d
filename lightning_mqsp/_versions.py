"""The oldest releases of the dependencies lightning-mqsp is tested with, checked at import.

``pyproject.toml`` declares the same floors and ``requirements/floor.txt`` pins them for ``make test-floor``,
which runs a subset of the suite against exactly these versions (``tests/test_packaging.py`` keeps the three
in step). Below a floor the package refuses to import with the command that fixes it, instead of failing
later with an ``AttributeError`` deep inside a training step.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

#: distribution name -> oldest supported release, and why it is the floor.
MINIMUM_VERSIONS: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "the oldest release the test subset (make test-floor) and the GPU check ran on"),
    "lightning": ("2.6", "the strategy hooks and ModelParallelStrategy as this package overrides them"),
    "transformers": ("5.0", "attention and masks dispatched through AttentionInterface (4.x BERT bypasses it)"),
}


def unsupported_versions(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per installed dependency older than its floor (``installed`` maps name -> version, for tests)."""
    if installed is None:
        installed = {}
        for name in MINIMUM_VERSIONS:
            try:
                installed[name] = version(name)
            except PackageNotFoundError:
                installed[name] = None
    problems = []
    for name, (floor, why) in MINIMUM_VERSIONS.items():
        found = installed.get(name)
        if found is None:
            problems.append(f"{name} is not installed: pip install '{name}>={floor}'")
        elif Version(found).release < Version(floor).release:
            problems.append(f"{name} {found} is older than {floor} ({why}): pip install --upgrade '{name}>={floor}'")
    return problems


def check_versions() -> None:
    """Raise ``ImportError`` naming every dependency below its floor and the command that fixes it."""
    problems = unsupported_versions()
    if problems:
        raise ImportError("lightning-mqsp needs newer dependencies:\n  " + "\n  ".join(problems))
