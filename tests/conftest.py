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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny byte-level checkpoint with random weights (context 64), for CLI and loader tests: copy it to edit."""
    from illada.checkpoint import save_checkpoint
    from illada.config import preset
    from illada.model import build_model
    from illada.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    save_checkpoint(build_model(config, seed=0), config, path, tokenizer=tok)
    return path
