from __future__ import annotations

import pytest
from rt_helpers import sample_updates


@pytest.fixture
def updates():
    return sample_updates()
