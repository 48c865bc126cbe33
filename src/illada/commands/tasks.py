"""`illada tasks make TASK --split S --n N --format F --out FILE`: verifiable synthetic task data as JSONL."""
from __future__ import annotations

import argparse

from illada.errors import IlladaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from illada.tasks import FORMATS, SPLITS, TASKS

    sub = parser.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    make = sub.add_parser("make", help="write N seeded records of a task to a JSONL file",
                          description="Write N records of a synthetic task (the same records for the same seed). "
                                      "Formats: text = pre-training documents {\"text\"} for `illada prepare`; "
                                      "sft = chats {\"messages\"} for `illada prepare --kind sft`; eval = the "
                                      "records `illada eval` reads. Train and test problems never overlap.")
    make.add_argument("task", metavar="TASK", help="one of: " + ", ".join(TASKS))
    make.add_argument("--split", choices=SPLITS, default="train", help="train or test problems (default: train)")
    make.add_argument("--n", type=int, required=True, help="number of records")
    make.add_argument("--format", choices=FORMATS, default=None,
                      help="text | sft | eval (default: text for train, eval for test)")
    make.add_argument("--variant", default=None,
                      help="kind of eval record where a task has several (reversal: reverse | forward | infill)")
    make.add_argument("--templates", default=None, metavar="KIND,...",
                      help="arithmetic: only these problem kinds, of add, sub, mul, add_mul, paren_mul, word "
                           "(default: all)")
    make.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    make.add_argument("--unique", action="store_true",
                      help="no problem twice (default for eval records; may fail if the split is too small)")
    make.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file (written atomically)")


def run(args: argparse.Namespace) -> int:
    from illada.tasks import get_task, make_records, write_records

    if args.tasks_command != "make":
        raise IlladaError(f"unknown tasks action {args.tasks_command!r}")
    templates = [t.strip() for t in args.templates.split(",")] if args.templates is not None else None
    task = get_task(args.task, args.variant, templates)
    fmt = args.format or ("text" if args.split == "train" else "eval")
    records = make_records(task, args.split, args.n, fmt, seed=args.seed, unique=args.unique or fmt == "eval")
    out = write_records(records, args.out)
    print(f"{out}: {len(records):,} {task.name} {args.split} records ({fmt}, seed {args.seed})")
    return 0
