import os

import pytest
import torch

# one thread: the test models are tiny, and on a shared 2-core machine a second thread mostly waits
torch.set_num_threads(1)


@pytest.fixture
def sandbox_available():
    """Skip without a working bubblewrap, except under ILLADA_REQUIRE_SANDBOX=1 (CI), where that is a failure."""
    from illada.evaluation import sandbox

    found = sandbox.bubblewrap()
    if isinstance(found, str):
        if os.environ.get("ILLADA_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"ILLADA_REQUIRE_SANDBOX=1 but {found}")
        pytest.skip(found)
