"""Verifiable synthetic tasks: seeded generators of training text, SFT chats and eval records whose answers are
checked by an independent computation (see `illada tasks make`).

Each task is a `Task` (base.py): `example(rng)` draws one problem, `split_of(example)` assigns it to train or
test by a stable hash of its identity, so the splits never overlap and any `n` can be drawn for either split.
"""
from illada.tasks.base import FORMATS, SPLITS, Example, Task, make_records, write_records
from illada.tasks.registry import TASKS, get_task

__all__ = ["FORMATS", "SPLITS", "TASKS", "Example", "Task", "get_task", "make_records", "write_records"]
