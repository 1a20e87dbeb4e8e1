import os
import sys

import pytest
import torch

# `reference/` sits beside `nf4lib/` at the top of the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(min(torch.get_num_threads(), 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
