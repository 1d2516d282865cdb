import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import family  # noqa: E402


@pytest.fixture(scope="session")
def fam(tmp_path_factory):
    """A small Mistral family: base + 3 fine-tunes, bf16, one of them sharded."""
    root = tmp_path_factory.mktemp("family")
    return family(root)
