"""The examples in docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hjepa_metrics
import writers

MODULES = sorted(
    info.name
    for package in (hjepa_metrics, writers)
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("page", ["metrics.md"])
def test_docs_examples(page: str) -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / page
    result = doctest.testfile(
        str(path), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} example(s) failed in docs/{page}"
