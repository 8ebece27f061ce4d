"""The package as users install and import it: the repository root never shadows an installed package, and the
declared dependency floors are the ones ``make test-floor`` tests and the import checks."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lightning_mqsp._versions import MINIMUM_VERSIONS, check_versions, unsupported_versions

REPO = Path(__file__).resolve().parent.parent
IMPORT_MODELING_STACK = (
    "import transformers.modeling_utils, lightning_mqsp, lightning_mqsp.kernels.forward; import kernels; print(kernels.__file__)"
)


@pytest.mark.parametrize("how", ["cwd", "PYTHONPATH"])
def test_repository_root_first_on_sys_path_imports_the_installed_packages(how: str, tmp_path: Path) -> None:
    """``python -c`` (or a notebook) at the repository root, or ``PYTHONPATH=.``, puts the root first on sys.path.
    transformers imports Hugging Face's ``kernels`` package; this repository's ``kernels/`` folder must not be found
    in its place (it has no ``__init__.py``: a regular package anywhere on the path wins over it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = REPO if how == "cwd" else tmp_path
    if how == "PYTHONPATH":
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", IMPORT_MODELING_STACK], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file = proc.stdout.strip().splitlines()[-1]
    if importlib.util.find_spec("kernels") is not None and kernels_file != "None":
        assert not kernels_file.startswith(str(REPO / "kernels")), f"the repository's kernels/ shadowed the package: {kernels_file}"


def test_kernels_folder_stays_a_namespace_portion() -> None:
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows Hugging Face's `kernels` (which transformers "
        "imports) whenever the repository root is on sys.path: keep the folder without it"
    )


def _floors(requirements: list[str]) -> dict[str, str]:
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([0-9][0-9.]*)", requirement.split(";")[0].strip())
        if match:
            floors[match[1].lower()] = match[2]
    return floors


def test_declared_floors_are_the_checked_and_tested_ones() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _floors(project["dependencies"])
    assert not [d for d in project["dependencies"] if "<" in d], "an upper bound needs a known break, named beside it"
    pinned = _floors([line for line in (REPO / "requirements" / "floor.txt").read_text().splitlines() if not line.startswith("#")])
    for name, (floor, _why) in MINIMUM_VERSIONS.items():
        assert declared[name] == floor, f"pyproject.toml declares {name}>={declared[name]}, _versions.py {floor}"
        assert pinned[name].startswith(floor), f"requirements/floor.txt tests {name}=={pinned[name]}, not the floor {floor}"


def test_old_or_missing_dependencies_are_refused_with_the_fix() -> None:
    problems = unsupported_versions({"torch": "2.10.0+cpu", "lightning": "2.6.0", "transformers": "4.57.1"})
    assert len(problems) == 2
    assert "torch 2.10.0+cpu is older than 2.11" in problems[0] and "pip install --upgrade 'torch>=2.11'" in problems[0]
    assert "transformers 4.57.1 is older than 5.0" in problems[1] and "AttentionInterface" in problems[1]
    assert unsupported_versions({"torch": "2.11.0", "lightning": "2.6.0", "transformers": None}) == [
        "transformers is not installed: pip install 'transformers>=5.0'"
    ]
    assert unsupported_versions({"torch": "2.11.0rc1", "lightning": "2.6.0", "transformers": "5.0.0"}) == []


def test_check_versions_raises_import_error_naming_every_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_mqsp._versions as versions

    monkeypatch.setattr(versions, "version", lambda name: {"torch": "2.9.1", "lightning": "2.5.0"}.get(name, "9.0"))
    with pytest.raises(ImportError, match=r"(?s)torch 2.9.1 is older than 2.11.*lightning 2.5.0 is older than 2.6"):
        check_versions()
