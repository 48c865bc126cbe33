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


HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A packed byte-level pre-training set of a few Hamlet lines (for trainer tests)."""
    from illada.data.prepare import prepare_pretrain

    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(HAMLET)
    prepare_pretrain([root / "corpus.txt"], root / "packed", "bytes", progress=False)
    return root / "packed"
