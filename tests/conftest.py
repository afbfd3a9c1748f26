import os
import shutil

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


@pytest.fixture
def store_dir(template, tmp_path):
    """A private copy of the module's ``template`` store (a module-scoped fixture that
    builds one store for all its tests); modules with a ``store_dir`` of their own keep it."""
    path = os.path.join(tmp_path, "store")
    shutil.copytree(template, path)
    return path
