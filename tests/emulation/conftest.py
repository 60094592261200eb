"""Emulation tests need root and kernel features; they skip with the reason where absent."""
from __future__ import annotations

import pytest

from emulation.backends import netns_missing
from emulation.probe import probe


@pytest.fixture(scope="session")
def caps():
    return probe()


@pytest.fixture(scope="session")
def netns_caps(caps):
    missing = netns_missing(caps)
    if missing:
        pytest.skip(f"netns backend unavailable here: missing {', '.join(missing)}")
    return caps
