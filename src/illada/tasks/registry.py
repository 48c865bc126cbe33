"""Task name -> task."""
from __future__ import annotations

from illada.errors import IlladaError
from illada.tasks.arithmetic import Arithmetic
from illada.tasks.base import Task
from illada.tasks.reversal import Reversal
from illada.tasks.sudoku import Sudoku

TASKS: dict[str, type[Task]] = {t.name: t for t in (Arithmetic, Sudoku, Reversal)}


def get_task(name: str, variant: str | None = None, templates: list[str] | None = None) -> Task:
    """The task `name`; `variant` picks which eval records it writes (e.g. reversal: reverse, forward, infill);
    `templates` restricts arithmetic to some of its problem kinds."""
    if name not in TASKS:
        raise IlladaError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if templates is not None:
        if TASKS[name] is not Arithmetic:
            raise IlladaError(f"task {name}: --templates applies to arithmetic only")
        return Arithmetic(variant, templates)
    return TASKS[name](variant)
