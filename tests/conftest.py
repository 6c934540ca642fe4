import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (always on when CI=true)")
    parser.addoption("--experiments", action="store_true", help="also run the experiments' end-to-end tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = config.getoption("--slow") or os.environ.get("CI") == "true"
    experiments = config.getoption("--experiments")
    skip_slow = pytest.mark.skip(reason="slow: run with --slow (CI runs them)")
    # An experiment's script end to end (tens of minutes): it protects a study in docs/experiments, not a feature
    skip_experiment = pytest.mark.skip(reason="experiment: run with --experiments (CI does not)")
    for item in items:
        if "experiment" in item.keywords and not experiments:
            item.add_marker(skip_experiment)
        elif "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module's tests, restored after it; a module takes it with
    `pytestmark = pytest.mark.usefixtures("single_thread")`. The test models are tiny: a second OpenMP thread buys
    nothing, and on a loaded 2-core box it spins for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete store per back-end, in `intact/zarr` and `intact/lmdb` (store_helpers' manifest: 2 epochs x
    3000 records, shards of 512), for a module's tests to copy and damage."""
    from store_helpers import manifest, write_in_order

    from logit_store import create_store

    root = tmp_path_factory.mktemp("intact")
    for backend in ("zarr", "lmdb"):
        store = create_store(root / backend, manifest(backend))
        for epoch in range(store.manifest.epochs):
            write_in_order(store, epoch)
        store.close()  # this process keeps no lmdb environment open: the tests' readers open their own
    return root
