"""Run the doctest examples of every onceflow module, imported by its installed name.

The modules of runtime/, operators/ and checkpoint/ are ``onceflow.runtime.*`` and so on; pytest's
``--doctest-modules`` would import those files by path as top-level ``runtime.*``, a second copy of
each module. This file finds the modules through the ``onceflow`` package instead, so it runs the
same examples against an editable install and a wheel alike.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

PACKAGES = ("onceflow", "onceflow.runtime", "onceflow.operators", "onceflow.checkpoint")


def _module_names() -> list[str]:
    names: set[str] = set()
    for package in PACKAGES:
        names.add(package)
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, prefix=f"{package}."):
            names.add(info.name)
    return sorted(names)


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    found = []
    for name in _module_names():
        module = importlib.import_module(name)
        found.extend(test for test in finder.find(module, name) if test.examples)
    return sorted(found, key=lambda test: test.name)


DOCTESTS = _doctests()


def test_the_doctests_cover_every_folder() -> None:
    folders = {test.name.split(".")[1] for test in DOCTESTS if test.name.count(".") > 1}
    assert {"runtime", "operators", "checkpoint"} <= folders
    assert len(DOCTESTS) >= 70


@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_doctest(test: doctest.DocTest) -> None:
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=report.write, clear_globs=True)
    assert result.failed == 0, f"{test.filename}:{test.lineno}\n{report.getvalue()}"
