import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def no_user_cache(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test cache below is set: they get a
    cache of the session's own, so no test reads or writes the user's (an entry left there by an older
    prefkit would be found and change what a test sees)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFKIT_CACHE", str(tmp_path_factory.mktemp("session-prefkit-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def prefkit_cache(tmp_path, monkeypatch):
    """Each test gets its own empty cache (tiny models build in well under a second), never the user's."""
    root = tmp_path / "prefkit-cache"
    monkeypatch.setenv("PREFKIT_CACHE", str(root))
    return root


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny-model ops are too small to gain from threads, and on a busy 2-core machine two threads
    make them ten times slower: the fast suite runs on one. Slow (SmolLM2) tests keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
