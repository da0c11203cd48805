import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def prefkit_cache(tmp_path, monkeypatch):
    """Each test gets its own empty cache (tiny models build in well under a second), never the user's."""
    root = tmp_path / "prefkit-cache"
    monkeypatch.setenv("PREFKIT_CACHE", str(root))
    return root
