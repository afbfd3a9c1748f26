import os

import pytest
import torch

# two cores: keep torch's own pool from fighting our worker threads
torch.set_num_threads(1)


@pytest.fixture
def store_path(tmp_path):
    return os.path.join(tmp_path, "store")


@pytest.fixture
def store(store_path):
    import deltackpt

    s = deltackpt.open(store_path)
    yield s
    s.close()
