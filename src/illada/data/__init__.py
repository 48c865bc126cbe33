"""Training data: `prepare` turns raw corpora into token shards, `shards` reads them back."""
from illada.data.shards import PackedTokens, PairExamples, open_dataset

__all__ = ["PackedTokens", "PairExamples", "open_dataset", "prepare_pretrain", "prepare_sft"]


def __getattr__(name: str):
    # prepare pulls in the tokenizer and rich; the trainer only needs the readers
    if name in ("prepare_pretrain", "prepare_sft"):
        from illada.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'illada.data' has no attribute {name!r}")
