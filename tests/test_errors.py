"""Tests for onceflow.errors: a leaf module whose errors keep their attributes through pickling."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import onceflow as of
from onceflow import errors
from onceflow.errors import CheckpointError, DataError, JobFailedError, OnceflowError, OperatorError


def test_the_errors_module_imports_nothing_from_onceflow() -> None:
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.split(".")[0] == "onceflow"]


@pytest.mark.parametrize(
    "error",
    [
        DataError("bad column", operator="sum", column="amount"),
        OperatorError("boom", operator="map", subtask=1),
        CheckpointError("expired", reason="expired"),
        JobFailedError("failed", job="j", operator="map/1"),
    ],
)
def test_errors_keep_their_type_message_and_attributes_through_pickle(error: OnceflowError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.args == error.args
    assert copy.__dict__ == error.__dict__


def test_the_public_names_are_the_errors_module_classes() -> None:
    assert of.DataError is DataError
    assert of.OnceflowError is OnceflowError
