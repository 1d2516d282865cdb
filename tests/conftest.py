import sys
from pathlib import Path

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not turn red by luck); HYPOTHESIS_PROFILE=explore
# draws new ones, to hunt for bugs.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

sys.path.insert(0, str(Path(__file__).parent))

from helpers import family  # noqa: E402


@pytest.fixture(scope="session")
def fam(tmp_path_factory):
    """A small Mistral family: base + 3 fine-tunes, bf16, one of them sharded."""
    root = tmp_path_factory.mktemp("family")
    return family(root)
