"""Makes the fixture modules' fixtures available to their self-tests, whether or not tests/conftest.py does."""

from __future__ import annotations

import pytest

_PLUGINS = ("tests.fixtures.s3servers", "tests.fixtures.faultproxy")


def pytest_configure(config: pytest.Config) -> None:
    # Registering twice would define every fixture twice (and start every session server twice).
    for name in _PLUGINS:
        if not config.pluginmanager.has_plugin(name):
            config.pluginmanager.import_plugin(name)
