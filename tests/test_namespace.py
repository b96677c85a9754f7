"""onceflow is the only top-level import package: runtime/, operators/ and checkpoint/ install as onceflow.*."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"onceflow.runtime": "runtime", "onceflow.operators": "operators", "onceflow.checkpoint": "checkpoint"}

# A job script beside the user's own operators.py, runtime.py and checkpoint.py (the script's folder is
# first on sys.path, as for any `python job.py`). It builds and plans a dataflow without starting Ray.
JOB = """
import checkpoint
import operators
import runtime

import onceflow as of
from onceflow.testing.sink import TestingSink
from onceflow.testing.source import TestingSource
from onceflow.runtime.plan import plan

flow = of.Dataflow("shadowed")
(flow.source(TestingSource([{"user_id": 1, "amount": 2.0}]), name="events")
     .key_by("user_id")
     .reduce(lambda a, b: a, name="first")
     .sink(TestingSink(), name="out"))
physical = plan(flow, parallelism=2)
assert [operators.OWN, runtime.OWN, checkpoint.OWN] == ["operators", "runtime", "checkpoint"]
print(len(physical.vertices), "vertices")
"""


def test_a_job_beside_its_own_operators_runtime_and_checkpoint_modules_imports_onceflow(tmp_path: Path) -> None:
    for name in ("operators", "runtime", "checkpoint"):
        (tmp_path / f"{name}.py").write_text(f"OWN = {name!r}\n")
    (tmp_path / "job.py").write_text(textwrap.dedent(JOB))
    done = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("vertices")


def test_every_module_of_the_three_folders_imports_under_onceflow_from_its_folder() -> None:
    names = []
    for package, folder in FOLDERS.items():
        module = importlib.import_module(package)
        assert Path(module.__file__).resolve().parent == ROOT / folder
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            names.append(info.name)
            imported = importlib.import_module(info.name)
            relative = Path(*info.name.split(".")[1:])
            expected = ROOT / relative / "__init__.py" if info.ispkg else ROOT / relative.with_suffix(".py")
            assert Path(imported.__file__).resolve() == expected, info.name
    assert len(names) > 30
    assert not {"runtime", "operators", "checkpoint"} & set(sys.modules), "a folder was imported as a top-level name"


def test_the_distribution_declares_onceflow_as_its_only_top_level_package() -> None:
    top_level = importlib.metadata.distribution("onceflow").read_text("top_level.txt")
    assert top_level is not None
    assert top_level.split() == ["onceflow"]
