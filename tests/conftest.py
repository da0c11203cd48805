import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def prefkit_cache(tmp_path, monkeypatch):
    """Each test gets its own empty cache (tiny models build in well under a second), never the user's."""
    root = tmp_path / "prefkit-cache"
    monkeypatch.setenv("PREFKIT_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model ops are too small to gain from threads; on a busy 2-core machine two threads make
    them ten times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
