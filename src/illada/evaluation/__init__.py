"""Benchmarks by the iLLaDA paper's protocols on local files: choice tasks (confidence / likelihood scoring),
GSM8K-style generation with answer extraction, HumanEval-style code run in a sandbox (`illada eval`)."""
from illada.evaluation.answers import extract_answer, extract_gold, extract_letter, normalize_number, numbers_equal
from illada.evaluation.presets import KINDS, PRESETS, TaskPreset, get_preset
from illada.evaluation.runner import EvalResult, evaluate, print_table, write_results
from illada.evaluation.sandbox import SandboxResult, run_python
from illada.evaluation.tasks import load_samples, read_jsonl

__all__ = [
    "KINDS", "PRESETS", "EvalResult", "SandboxResult", "TaskPreset", "evaluate", "extract_answer", "extract_gold",
    "extract_letter", "get_preset", "load_samples", "normalize_number", "numbers_equal", "print_table",
    "read_jsonl", "run_python", "write_results",
]
