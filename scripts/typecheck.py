"""Type-check every onceflow module with mypy, each under the name it is imported by.

The repository keeps ``runtime/``, ``operators/`` and ``checkpoint/`` at its top level and installs them
as ``onceflow.runtime``, ``onceflow.operators`` and ``onceflow.checkpoint`` (``[tool.setuptools.package-dir]``
in pyproject.toml). mypy maps a file to a module by its folders alone, so plain ``mypy runtime`` would
check ``runtime.job`` and see every ``onceflow.runtime`` import as missing. This script hands mypy each
file with its installed module name and otherwise runs it as the command line does, with the settings of
``[tool.mypy]``.

Usage: ``.venv/bin/python scripts/typecheck.py [extra mypy options]``; the exit status is mypy's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.fscache import FileSystemCache
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"onceflow": "onceflow", "onceflow.runtime": "runtime", "onceflow.operators": "operators",
            "onceflow.checkpoint": "checkpoint"}
"""Each installed package and the repository folder it is built from (as pyproject.toml maps them)."""


def sources() -> list[BuildSource]:
    """Every ``.py`` file of the packages, named as it is imported."""
    found = []
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append(BuildSource(str(path.relative_to(ROOT)), ".".join((package, *parts))))
    return found


def main(argv: list[str]) -> int:
    """Run mypy over :func:`sources` and print its messages; return its exit status."""
    os.chdir(ROOT)
    started = time.monotonic()
    fscache = FileSystemCache()
    _, options = process_options(["--config-file", "pyproject.toml", *argv, "onceflow"], fscache=fscache)
    files = sources()
    messages: list[str] = []

    def flush(_filename: str | None, new: list[str], _serious: bool) -> None:
        messages.extend(new)
        for line in new:
            print(line)

    blocked = False
    try:
        build.build(files, options, None, flush, fscache, sys.stdout, sys.stderr)
    except CompileError:
        blocked = True
    errors = [line for line in messages if ": error:" in line]
    if blocked or errors:
        with_errors = len({line.split(":", 1)[0] for line in errors})
        print(f"Found {len(errors)} errors in {with_errors} files (checked {len(files)} source files)")
        return 2 if blocked else 1
    print(f"Success: no issues found in {len(files)} source files ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
