"""The release files agree with each other: one version, the license, the citation, the
changelog, ``py.typed``, extras whose lower bounds agree, and an sdist that carries its
tests' helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import wdanalysis

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
yaml = pytest.importorskip("yaml")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_version_has_one_source():
    data = _project()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    attr = data["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "wdanalysis.__version__"
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert str(cff["version"]) == wdanalysis.__version__
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{wdanalysis.__version__}]" in changelog


def test_license_citation_and_typing_marker():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert _project()["project"]["license"] == "Apache-2.0"
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["license"] == "Apache-2.0"
    assert any("DoRA" in ref["title"] for ref in cff["references"])
    assert (REPO / "wdanalysis" / "py.typed").is_file()
    assert "py.typed" in _project()["tool"]["setuptools"]["package-data"]["wdanalysis"]


def _bounds(requirements: list[str]) -> dict[str, str]:
    found = {}
    for req in requirements:
        match = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([\w.]+)", req)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_extras_agree_on_lower_bounds_and_dev_holds_test_lint_docs():
    project = _project()["project"]
    extras = project["optional-dependencies"]
    seen: dict[str, set[str]] = {}
    for requirements in [project["dependencies"], *extras.values()]:
        for name, bound in _bounds(requirements).items():
            seen.setdefault(name, set()).add(bound)
    disagree = {name: bounds for name, bounds in seen.items() if len(bounds) > 1}
    assert not disagree, disagree
    assert extras["dev"] == ["wdanalysis[test,lint,docs]"]
    every = re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(",")
    assert set(every) == set(extras) - {"dev", "test", "lint", "docs", "all"}


def test_sdist_manifest_ships_the_test_helpers():
    manifest = (REPO / "MANIFEST.in").read_text()
    for line in ("graft tests", "graft figures", "graft notebooks", "graft scripts"):
        assert line in manifest
    for name in ("LICENSE", "CITATION.cff", "CHANGELOG.md"):
        assert name in manifest
