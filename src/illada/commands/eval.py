"""`illada eval --model M --task T --data FILE`: a benchmark by the paper's protocol on a local JSONL file."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from illada.commands.generate import add_model_arguments
    from illada.commands.sampling_flags import add_sampling_flags
    from illada.evaluation.presets import PRESETS

    add_model_arguments(parser)
    parser.add_argument("--task", required=True, metavar="TASK",
                        help="preset: " + ", ".join(PRESETS) + " (see the reference §6.3)")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="the task's samples (local JSONL)")
    parser.add_argument("--instruct", action="store_true", help="use the task's -instruct preset (chat template)")
    parser.add_argument("--fewshot-data", default=None, metavar="FILE.jsonl",
                        help="few-shot examples (default: other samples of --data)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override the preset's number of shots (default: the preset's)")
    parser.add_argument("--method", default=None, choices=["confidence", "mc", "exact", "generate"],
                        help="override the scoring method of a choice task (default: the preset's)")
    parser.add_argument("--mc-num", type=int, default=None,
                        help="Monte Carlo samples for --method mc (default: the preset's)")
    parser.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="likelihood scoring (exact, mc): prepend BOS (default: the preset's; mmlu/cmmlu: yes)")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="likelihood scoring (exact, mc): append EOS after the answer (default: the preset's; "
                             "mmlu/cmmlu: yes, the published BOS + context + [MASK] + EOS)")
    g = parser.add_argument_group("sampling (generation tasks; default: the preset's, one token per pass, greedy)")
    add_sampling_flags(g, skip={"seed"}, defaults=False, unset="the preset's")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval test program")
    parser.add_argument("--allow-unsandboxed-code", action="store_true",
                        help="UNSAFE: where bubblewrap is missing, run model-written HumanEval code anyway, with only "
                             "resource limits and a timeout (it can read and change your files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write DIR/<task>.json (results) and DIR/<task>.samples.jsonl (per-sample log)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from illada.commands.generate import load_model
    from illada.commands.sampling_flags import sampling_changes
    from illada.evaluation import evaluate, get_preset, load_samples, print_table, write_results
    from illada.files import check_output_dir

    preset = get_preset(args.task, instruct=args.instruct)
    preset = preset.replace(method=args.method, num_fewshot=args.num_fewshot, mc_num=args.mc_num,
                            add_bos=args.add_bos, append_eos=args.append_eos, **sampling_changes(args))
    samples = load_samples(args.data, preset.kind)
    fewshot = load_samples(args.fewshot_data, preset.kind) if args.fewshot_data else None
    out = check_output_dir(args.out, "--out") if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if preset.kind == "humaneval":  # before loading anything: no isolation, no run (unless opted in)
        from illada.evaluation.sandbox import require_isolation
        require_isolation(args.allow_unsandboxed_code)
    lm = load_model(args)
    result = evaluate(lm, preset, samples, fewshot_pool=fewshot, limit=args.limit, batch_size=args.batch_size,
                      seed=args.seed, timeout=args.timeout, allow_unsandboxed=args.allow_unsandboxed_code,
                      log_path=out / f"{preset.name}.samples.jsonl" if out else None, progress=not args.no_progress)
    if out is not None:
        write_results(result, out / f"{preset.name}.json")
    print_table([result])
    if out is not None:
        print(f"results: {out / (preset.name + '.json')}  per-sample log: {out / (preset.name + '.samples.jsonl')}")
    return 0
