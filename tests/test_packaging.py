"""What ``pip install .`` ships: the package data the app needs, and nothing it names in vain."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_data() -> dict[str, list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]


def test_every_package_data_pattern_names_files_that_exist():
    for package, patterns in package_data().items():
        base = ROOT / package.replace(".", "/")
        for pattern in patterns:
            assert any(path.is_file() for path in base.glob(pattern)), (
                f"{package}: {pattern!r} matches no file"
            )


def test_the_lua_scripts_and_the_type_marker_are_shipped():
    patterns = package_data()["quotas"]
    assert "py.typed" in patterns
    assert any(pattern.endswith(".lua") for pattern in patterns)
