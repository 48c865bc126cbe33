"""Pictures of the denoising process: a live terminal view, and recordings as HTML or GIF.

A frame is (canvas, step_of) for one row: token ids with masks, and the step that committed each position
(-1 for the prompt and for positions still masked). Tokens are coloured by that step, early steps blue to
late steps red, so the order in which a diffusion model writes is visible.
"""
from __future__ import annotations

import colorsys
import html
from pathlib import Path
from typing import Callable, Sequence

from illada.errors import IlladaError
from illada.files import write_atomic

MASK_GLYPH = "░"
CONTEXT_STEP = -2  # a piece of fixed text inside the canvas (infill: the text around the holes)


def step_colour(step: int, total: int) -> str:
    """Hex colour for a commit step: hue from blue (first) to red (last)."""
    fraction = step / max(total - 1, 1)
    r, g, b = colorsys.hsv_to_rgb(0.66 * (1.0 - fraction), 0.75, 0.95)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def frame_pieces(canvas: Sequence[int], step_of: Sequence[int], start: int, mask_id: int,
                 token_text: Callable[[int], str], pad_id: int | None = None) -> list[tuple[str, int]]:
    """(text, step) for each generated position from `start`: step -1 means masked."""
    pieces = []
    for token, step in zip(canvas[start:], step_of[start:]):
        if token == mask_id:
            pieces.append((MASK_GLYPH, -1))
        elif pad_id is not None and token == pad_id and step < 0:
            continue
        else:
            pieces.append((token_text(token), step))
    return pieces


def canvas_pieces(canvas: Sequence[int], step_of: Sequence[int], holes: Sequence[bool], real: Sequence[bool],
                  mask_id: int, token_text: Callable[[int], str]) -> list[tuple[str, int]]:
    """(text, step) for every real position of an infill canvas: CONTEXT_STEP for the fixed text, -1 for a hole
    still masked, else the step that filled it (the holes resolve in place)."""
    pieces = []
    for token, step, hole, keep in zip(canvas, step_of, holes, real):
        if not keep:
            continue
        if not hole:
            pieces.append((token_text(token), CONTEXT_STEP))
        else:
            pieces.append((MASK_GLYPH, -1) if token == mask_id and step < 0 else (token_text(token), step))
    return pieces


def rich_frame(prompt: str, pieces: list[tuple[str, int]], total_steps: int, footer: str = ""):
    """A rich Text of the prompt (dim) followed by the canvas, tokens coloured by commit step."""
    from rich.text import Text

    text = Text(prompt, style="dim")
    for piece, step in pieces:
        style = "dim" if step == CONTEXT_STEP else "grey37" if step < 0 else step_colour(step, total_steps)
        text.append(piece, style=style)
    if footer:
        text.append("\n" + footer, style="italic")
    return text


def write_html(path: Path, prompt: str, frames: list[list[tuple[str, int]]], total_steps: int, title: str) -> None:
    """A self-contained page: a slider over the steps, tokens coloured by the step that committed them."""
    rendered = []
    for pieces in frames:
        spans = "".join(
            f'<span class="c">{html.escape(t)}</span>' if s == CONTEXT_STEP
            else f'<span class="m">{html.escape(t)}</span>' if s < 0
            else f'<span style="color:{step_colour(s, total_steps)}" title="step {s}">{html.escape(t)}</span>'
            for t, s in pieces)
        rendered.append(f'<div class="frame">{spans}</div>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:ui-monospace,monospace;background:#111;color:#ddd;margin:2em;max-width:60em}}
.frame{{white-space:pre-wrap;display:none;line-height:1.5}} .m{{color:#444}} .c{{color:#888}} .p{{color:#888;white-space:pre-wrap}}
input{{width:100%}}</style></head><body><h3>{html.escape(title)}</h3>
<input id="s" type="range" min="0" max="{len(frames) - 1}" value="{len(frames) - 1}">
<p>step <span id="n"></span> / {len(frames) - 1}</p><div class="p">{html.escape(prompt)}</div>
{''.join(rendered)}
<script>const f=document.querySelectorAll('.frame'),s=document.getElementById('s'),n=document.getElementById('n');
function show(){{f.forEach((e,i)=>e.style.display=i==s.value?'block':'none');n.textContent=s.value;}}
s.oninput=show;show();</script></body></html>"""
    write_atomic(path, page.encode())


def write_gif(path: Path, prompt: str, frames: list[list[tuple[str, int]]], total_steps: int, title: str,
              max_frames: int = 120) -> None:
    """An animated GIF (matplotlib + Pillow) of the canvas resolving, at most `max_frames` frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    if len(frames) > max_frames:
        keep = sorted({round(i * (len(frames) - 1) / (max_frames - 1)) for i in range(max_frames)})
        frames = [frames[i] for i in keep]
    width = 80
    fig = plt.figure(figsize=(8, 4.5), dpi=100)
    fig.patch.set_facecolor("#111111")

    def draw(index: int):
        fig.clear()
        fig.text(0.02, 0.96, f"{title} — frame {index + 1}/{len(frames)}", color="#dddddd", fontsize=9,
                 family="monospace", va="top")
        x, y = 0, 0
        line_height, char_width = 0.045, 0.0118
        for text, step in [(prompt, -2)] + frames[index]:
            colour = "#777777" if step == -2 else ("#444444" if step < 0 else step_colour(step, total_steps))
            for part_index, part in enumerate(text.split("\n")):
                if part_index:
                    x, y = 0, y + 1
                if x + len(part) > width:
                    x, y = 0, y + 1
                if part and y < 19:
                    fig.text(0.02 + x * char_width, 0.9 - y * line_height, part, color=colour, fontsize=9,
                             family="monospace", va="top")
                x += len(part)
        return []

    animation = FuncAnimation(fig, draw, frames=len(frames), blit=False)
    tmp = path.with_name(f".{path.name}.tmp.gif")
    animation.save(tmp, writer=PillowWriter(fps=8))
    plt.close(fig)
    tmp.replace(path)


def record(path: str | Path, prompt: str, frames: list[list[tuple[str, int]]], total_steps: int,
           title: str = "illada denoising") -> Path:
    """Write the history as .html or .gif, chosen by the file suffix."""
    path = Path(path)
    if path.suffix not in (".html", ".gif"):
        raise IlladaError(f"--record: {path} must end in .html or .gif")
    if not path.parent.exists():
        raise IlladaError(f"--record: directory {path.parent} does not exist")
    if not frames:
        raise IlladaError("--record: nothing was generated")
    (write_html if path.suffix == ".html" else write_gif)(path, prompt, frames, total_steps, title)
    return path
