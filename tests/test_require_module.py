"""`require_module`: optional test dependencies skip on a partial install, and fail in CI."""
from __future__ import annotations

import pytest
from conftest import require_module

MISSING = "promptmux_no_such_module"


def test_present_module_is_returned():
    assert require_module("json").dumps([1]) == "[1]"


def test_missing_module_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs {MISSING}"):
        require_module(MISSING)


def test_missing_module_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        require_module(MISSING)
