import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")
