"""Re-point one of PEFT's generic test classes at SD-LoRA: same test bodies, our cases.

PEFT parametrizes its generic tests over module-level case lists (`TEST_CASES`, `ALL_CONFIGS`, ...). A subclass
inherits the bodies with those marks, so `repointed_tests` builds, for every test of the parent class, either a copy
parametrized over SD-LoRA's cases (when it was parametrized over one of the given lists) or None (hidden: the test
takes no case list, so it is written for one particular PEFT method, e.g. LoRA's DoRA or IA3's grouped convolutions).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def repointed_tests(
    parent: type,
    cases: list[tuple[list, list]],
    skips: dict[str, str] | None = None,
    environment: dict[str, dict[str, str]] | None = None,
) -> dict[str, Callable | None]:
    """Class attributes for a subclass of `parent`.

    Args:
        cases: (PEFT's case list, ours) pairs; a parametrize mark over PEFT's list (the same object) gets ours.
        skips: test name -> the reason it does not apply to SD-LoRA; the test is reported as skipped with it.
        environment: test name -> environment variables set while it runs.
    """
    skips, environment = skips or {}, environment or {}
    attributes: dict[str, Callable | None] = {}
    for name in dir(parent):
        test = getattr(parent, name)
        if not name.startswith("test_") or not callable(test):
            continue
        original = getattr(test, "pytestmark", [])
        marks = [_repoint_mark(mark, cases) for mark in original]
        if marks == original:  # no case list of PEFT's: a test written for one particular method
            attributes[name] = None
            continue
        if name in skips:
            marks.append(pytest.mark.skip(reason=skips[name]).mark)
        attributes[name] = _copy(test, marks, environment.get(name))
    unknown = (set(skips) | set(environment)) - {name for name, test in attributes.items() if test is not None}
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not re-pointed tests of {parent.__name__}")
    return attributes


def _repoint_mark(mark: Any, cases: list[tuple[list, list]]) -> Any:
    """The mark over our cases if `mark` parametrizes over one of PEFT's lists, else `mark` itself (other
    parametrizations, over dtypes or flags, stay)."""
    if mark.name != "parametrize":
        return mark
    for theirs, ours in cases:
        if mark.args[1] is theirs:
            return pytest.mark.parametrize(mark.args[0], ours).mark
    return mark


def _copy(test: Callable, marks: list, env: dict[str, str] | None) -> Callable:
    @functools.wraps(test)
    def run(self, *args, **kwargs):
        with _environment(env or {}):
            return test(self, *args, **kwargs)

    run.pytestmark = marks  # type: ignore[attr-defined]
    return run


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
