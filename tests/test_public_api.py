"""Every public name the READMEs use resolves: ``of.<name>``, ``from onceflow... import <name>`` and module paths."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import onceflow as of

ROOT = Path(__file__).resolve().parent.parent
TEXT = "\n".join((ROOT / name).read_text() for name in ("README.md", "benchmarks/README.md"))


@pytest.mark.parametrize("name", sorted(set(re.findall(r"\bof\.([A-Za-z_][\w.]*[A-Za-z_\d])", TEXT))))
def test_of_names_resolve(name: str) -> None:
    value: object = of
    for part in name.split("."):
        value = getattr(value, part)


@pytest.mark.parametrize(("module", "name"), sorted(set(re.findall(r"from (onceflow[\w.]*) import (\w+)", TEXT))))
def test_imported_names_resolve(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module", sorted(set(re.findall(r"`(onceflow(?:\.\w+)+)`", TEXT))))
def test_named_modules_import(module: str) -> None:
    importlib.import_module(module)


def test_every_name_in_all_resolves() -> None:
    for package in (of, of.sources, of.sinks, of.windows, of.agg, importlib.import_module("onceflow.testing")):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.{name}"
