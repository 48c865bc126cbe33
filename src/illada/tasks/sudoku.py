"""6x6 sudoku (2x3 boxes): a puzzle with a unique solution -> that solution. A constraint puzzle where the order of
filling matters: a left-to-right decoder must write cells whose value follows only from cells further right,
a masked diffusion model can fill the forced cells first (Ye et al. 2024, "Beyond Autoregression").

Grids are written row by row, rows joined by "/", blanks as ".": `12.4.6/...`. A solution grid is a random
relabelling and row/column shuffle (within bands and stacks) of a base grid; cells are then emptied in random
order while the solution stays unique, down to `blanks` (random in [min_blanks, max_blanks]) empty cells.
The split key is the solution grid, so no test solution is ever seen in training.
"""
from __future__ import annotations

import random

from illada.tasks.base import Example, Task

SIZE, BOX_ROWS, BOX_COLS = 6, 2, 3
Grid = list[list[int]]  # 0 = blank


def box_of(r: int, c: int) -> int:
    return (r // BOX_ROWS) * (SIZE // BOX_COLS) + c // BOX_COLS


# the cells that share a row, column or box with each cell
_PEERS = [[(i, j) for i in range(SIZE) for j in range(SIZE)
           if (i, j) != (r, c) and (i == r or j == c or box_of(i, j) == box_of(r, c))]
          for r in range(SIZE) for c in range(SIZE)]


def is_solution(grid: Grid) -> bool:
    """Every row, column and 2x3 box holds 1..6 exactly once."""
    full = set(range(1, SIZE + 1))
    rows = [set(row) for row in grid]
    cols = [{grid[r][c] for r in range(SIZE)} for c in range(SIZE)]
    boxes = [{grid[r][c] for r in range(SIZE) for c in range(SIZE) if box_of(r, c) == b} for b in range(SIZE)]
    return len(grid) == SIZE and all(len(row) == SIZE for row in grid) and all(
        group == full for group in rows + cols + boxes)


def count_solutions(grid: Grid, limit: int = 2) -> int:
    """Number of completions of `grid` (blanks = 0), counting stops at `limit`. Backtracking on the most
    constrained blank."""
    grid = [row[:] for row in grid]

    def options(r: int, c: int) -> set[int]:
        return set(range(1, SIZE + 1)) - {grid[i][j] for i, j in _PEERS[r * SIZE + c]}

    def search() -> int:
        blanks = [(r, c) for r in range(SIZE) for c in range(SIZE) if grid[r][c] == 0]
        if not blanks:
            return 1
        r, c = min(blanks, key=lambda rc: len(options(*rc)))
        found = 0
        for value in sorted(options(r, c)):
            grid[r][c] = value
            found += search()
            grid[r][c] = 0
            if found >= limit:
                break
        return found

    return search()


def format_grid(grid: Grid) -> str:
    return "/".join("".join(str(v) if v else "." for v in row) for row in grid)


def parse_grid(text: str) -> Grid | None:
    """The grid written by `format_grid`, or None when `text` is not one."""
    rows = text.strip().split("/")
    if len(rows) != SIZE or any(len(row) != SIZE for row in rows):
        return None
    if any(ch not in ".123456" for row in rows for ch in row):
        return None
    return [[0 if ch == "." else int(ch) for ch in row] for row in rows]


def random_solution(rng: random.Random) -> Grid:
    base = [[(BOX_COLS * (r % BOX_ROWS) + r // BOX_ROWS + c) % SIZE + 1 for c in range(SIZE)] for r in range(SIZE)]
    digits = list(range(1, SIZE + 1))
    rng.shuffle(digits)
    bands = list(range(SIZE // BOX_ROWS))
    rng.shuffle(bands)
    rows = [b * BOX_ROWS + r for b in bands for r in rng.sample(range(BOX_ROWS), BOX_ROWS)]
    stacks = list(range(SIZE // BOX_COLS))
    rng.shuffle(stacks)
    cols = [s * BOX_COLS + c for s in stacks for c in rng.sample(range(BOX_COLS), BOX_COLS)]
    return [[digits[base[r][c] - 1] for c in cols] for r in rows]


class Sudoku(Task):
    name = "sudoku"
    eval_kind = "exact"
    min_blanks, max_blanks = 10, 20

    def example(self, rng: random.Random) -> Example:
        solution = random_solution(rng)
        puzzle = [row[:] for row in solution]
        target = rng.randint(self.min_blanks, self.max_blanks)
        blanks = 0
        for cell in rng.sample(range(SIZE * SIZE), SIZE * SIZE):
            if blanks == target:
                break
            r, c = divmod(cell, SIZE)
            puzzle[r][c] = 0
            if count_solutions(puzzle) == 1:
                blanks += 1
            else:
                puzzle[r][c] = solution[r][c]
        prompt = f"Sudoku: {format_grid(puzzle)}\nSolution:"
        answer = format_grid(solution)
        return Example(key=answer, prompt=prompt, response=f" {answer}",
                       record={"prompt": prompt, "answer": answer, "puzzle": format_grid(puzzle)})
