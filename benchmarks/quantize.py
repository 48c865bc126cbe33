"""Weight-only quantisation (`--quantize int8|int4`, torchao) against float32, side by side in one run.

For each model (the bundled ones, plus the sudoku MDM of `recipes/sudoku.sh` when runs/sudoku/ holds it):

    KL        mean KL(fp32 || quantised) of the denoiser's distributions at masked positions (nats)
    top-1     share of masked positions where the quantised argmax equals the fp32 argmax
    mask acc  the denoising task itself: share of masked tokens predicted exactly (30% of a held-out text masked;
              for the sudoku model, its test grids with the blanks masked)
    task      sudoku: whole-grid exact accuracy (`illada eval --task exact`, first --task-limit puzzles)
    tok/s     greedy generation of --new-tokens tokens (one per pass) on the first model, best of --repeats
    weights   bytes of the model's parameters

    OMP_NUM_THREADS=1 python benchmarks/quantize.py
    python benchmarks/quantize.py --task-limit 100 --new-tokens 128

Needs torchao (pip install 'illada[quant]'). runs/ is optional: without it only the bundled models are measured.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import illada
from illada.api import bundled_models
from illada.quantize import model_bytes

RUNS = Path(__file__).resolve().parent.parent / "runs"
MODES = ("fp32", "int8", "int4")
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our dreadful "
        "marches to delightful measures. Grim-visaged war hath smooth'd his wrinkled front.")


def load(model: str, mode: str):
    return illada.load(model, device="cpu", quantize=None if mode == "fp32" else mode)


def masked_batch(lm, texts: list[str], fraction: float, seed: int = 0):
    """(ids, masked ids, masked positions, real positions): `fraction` of each row's tokens masked at random."""
    g = torch.Generator().manual_seed(seed)
    rows = [lm.tokenizer.encode(text)[: lm.config.max_seq_len] for text in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), lm.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):
        real[i, : len(r)] = True
    chosen = (torch.rand(ids.shape, generator=g) < fraction) & real
    masked = ids.masked_fill(chosen, lm.mask_token_id)
    return ids, masked, chosen, real


def sudoku_batch(lm, records: list[dict]):
    """Puzzle + solution with the whole solution masked: (ids, masked, chosen, real)."""
    texts, puzzles = [], []
    for r in records:
        texts.append(r["prompt"] + " " + r["answer"])
        puzzles.append(r["prompt"])
    ids, _, _, real = masked_batch(lm, texts, 0.0)
    chosen = torch.zeros_like(real)
    for i, (puzzle, text) in enumerate(zip(puzzles, texts)):
        start = len(lm.tokenizer.encode(puzzle))
        end = len(lm.tokenizer.encode(text))
        chosen[i, start:end] = True
    chosen &= real
    masked = ids.masked_fill(chosen, lm.mask_token_id)
    return ids, masked, chosen, real


def logits(lm, masked, real) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(masked, attention_mask=real.long()).float()


def drift(reference: torch.Tensor, other: torch.Tensor, chosen: torch.Tensor) -> tuple[float, float]:
    ref, oth = reference[chosen].log_softmax(-1), other[chosen].log_softmax(-1)
    kl = (ref.exp() * (ref - oth)).sum(-1).mean().item()
    return kl, (ref.argmax(-1) == oth.argmax(-1)).float().mean().item()


def sudoku_accuracy(lm, data: Path, limit: int) -> float:
    """Whole-grid exact-match accuracy of the first `limit` test puzzles."""
    from illada.evaluation import evaluate, get_preset, load_samples

    preset = get_preset("exact").replace(max_new_tokens=48, block_length=48, steps=48)
    torch.manual_seed(0)
    result = evaluate(lm, preset, load_samples(data, preset.kind), limit=limit, batch_size=16, progress=False)
    return result.score


def tokens_per_second(lm, new_tokens: int, repeats: int) -> float:
    best = float("inf")
    lm.generate("To be, or not to be", max_new_tokens=8)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        lm.generate("To be, or not to be", max_new_tokens=new_tokens, block_length=32)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-limit", type=int, default=48, help="sudoku puzzles for the task accuracy (default: 48)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated for tok/s (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per mode, best kept (default: 3)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    models = [(name, str(path), None) for name, path in bundled_models().items() if (path / "config.json").is_file()]
    sudoku = RUNS / "sudoku"
    if (sudoku / "mdm").is_dir() and (sudoku / "test.jsonl").is_file():
        models.append(("sudoku MDM (runs/sudoku/mdm)", str(sudoku / "mdm"), sudoku / "test.jsonl"))
    else:
        print("runs/sudoku/mdm or its test.jsonl is missing: the sudoku rows are skipped")

    header = f"{'model':<32} {'mode':<5} {'KL':>8} {'top-1':>7} {'mask acc':>9} {'task':>7} {'tok/s':>7} {'weights':>9}"
    lines = []
    for index, (name, path, data) in enumerate(models):
        reference = None
        for mode in MODES:
            lm = load(path, mode)
            if data is None:
                texts = [TEXT[i:i + 200] for i in range(0, len(TEXT) - 100, 50)]
                ids, masked, chosen, real = masked_batch(lm, texts, 0.3)
            else:
                import json

                records = [json.loads(line) for line in data.read_text().splitlines()[:64]]
                ids, masked, chosen, real = sudoku_batch(lm, records)
            out = logits(lm, masked, real)
            if reference is None:
                reference = out
            kl, top1 = drift(reference, out, chosen)
            acc = (out.argmax(-1)[chosen] == ids[chosen]).float().mean().item()
            task = f"{sudoku_accuracy(lm, data, args.task_limit):.1%}" if data is not None else "-"
            speed = f"{tokens_per_second(lm, args.new_tokens, args.repeats):.1f}" if index == 0 else "-"
            lines.append(f"{name[:32]:<32} {mode:<5} {kl:>8.5f} {top1:>7.1%} {acc:>9.1%} {task:>7} {speed:>7} "
                         f"{model_bytes(lm.model) / 2**20:>7.1f}Mi")
            print(lines[-1], flush=True)
    print()
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
