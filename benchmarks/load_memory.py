"""Peak host memory of `illada.checkpoint.load_checkpoint` on a synthetic sharded checkpoint.

Writes random weights of a preset-like shape as an iLLaDA-layout checkpoint (safetensors shards + index) into a
temporary directory, then loads it in fresh subprocesses and reports, per scenario:

    weights   bytes of the loaded parameters (in the loaded dtype)
    baseline  peak RSS of the child after `import torch, illada.checkpoint`
    load      peak RSS right after load_checkpoint returns
    touched   peak RSS after reading every parameter once (memory-mapped pages become resident)
    anon/file the RSS after touching split into anonymous memory and pages of mapped files (the shards' memory
              maps, shared libraries): both count in RSS, so both count in the peak
    ratio     (touched - baseline) / weights; the target is < 1.3

Scenarios: `stored` keeps the checkpoint's dtype (bf16; CPU parameters are memory maps of the shards), `fp32`
casts while loading (what `illada.load` does on CPU), `naive` is the usual materialise-then-copy way
(random-initialised model + `safetensors.torch.load_file` + `load_state_dict`) for comparison; `int8` and `int4`
quantise while loading (`load_checkpoint(quantize=)`, torchao, float32 compute dtype as `illada.load` on CPU).
With quantised scenarios a last table compares each one's peak RSS above the baseline to `stored` (bf16):
the targets are <= 0.6x (int8) and <= 0.35x (int4). Every scenario runs in a fresh interpreter that imports what
it needs (torchao for int8/int4) before its baseline is taken, and is measured the same way (peak RSS, the
high-water mark the kernel keeps: nothing between samples is missed).

    python benchmarks/load_memory.py --shape 8b --layers 8 --scenarios stored,int8,int4   # 8B widths, 8 layers

    python benchmarks/load_memory.py                          # ~1.2B parameters, bf16 (~2.4 GB on disk)
    python benchmarks/load_memory.py --shape 8b --scenarios stored   # the illada-8b shape (~15 GB on disk)
    python benchmarks/load_memory.py --layers 4 --hidden 1024 --intermediate 2816

Temporary files are deleted at the end (unless --keep). Linux only (ru_maxrss in KiB, /proc/meminfo).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Overrides on top of the illada-8b preset (GQA 4:1, 155k vocabulary, tied embeddings).
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=7168, n_layers=16, n_heads=16, n_kv_heads=4),
    "8b": dict(),
}
SCENARIOS = ("stored", "fp32", "naive", "int8", "int4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--hidden", type=int, help="override the hidden size (heads keep head_dim 128)")
    p.add_argument("--intermediate", type=int, help="override the FFN size")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--scenarios", default="stored,fp32,naive", help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the synthetic checkpoint (GiB)")
    p.add_argument("--dir", default=None, help="where to create the temporary checkpoint (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    p.add_argument("--write", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(args):
    from illada.config import preset

    overrides = dict(SHAPES[args.shape])
    if args.layers:
        overrides["n_layers"] = args.layers
    if args.hidden:
        overrides.update(hidden_size=args.hidden, n_heads=args.hidden // 128, n_kv_heads=max(1, args.hidden // 512))
    if args.intermediate:
        overrides["intermediate_size"] = args.intermediate
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return preset("illada-8b", **overrides).replace(name=f"synthetic-{args.shape}")


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(config, path: Path, shard_bytes: int) -> int:
    """Random bf16 weights in the iLLaDA layout, one shard in memory at a time. Returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    from illada.checkpoint.adapter import ADAPTERS, config_to_hf
    from illada.checkpoint.io import expected_shapes

    adapter = ADAPTERS["illada"]
    shapes = list(expected_shapes(config).items())
    plan, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    n = len(plan)
    weight_map = {}
    for i, shard in enumerate(plan, 1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16)
            if len(shape) == 1:  # norm weights
                t.fill_(1.0)
            else:
                t.normal_(std=0.02)
            tensors[adapter.to_hf_name(name)] = t
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config_to_hf(config, torch.bfloat16)))
    return total


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _resident() -> dict[str, int]:
    """The current RSS split into anonymous memory and mapped-file pages (bytes)."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key[3:].lower()] = int(value.split()[0]) * 1024
    return out


def child(path: str, scenario: str) -> None:
    """Runs in a fresh process: load, touch every parameter, report peaks as one JSON line."""
    import torch

    import illada.checkpoint  # noqa: F401  (part of the baseline)

    if scenario in ("int8", "int4"):
        from illada.quantize import _quiet_import

        _quiet_import()  # torchao's import is part of the baseline too

    baseline = _peak()
    start = time.perf_counter()
    if scenario == "naive":
        from safetensors.torch import load_file

        from illada.checkpoint import load_config
        from illada.model import Transformer

        config = load_config(path)
        torch.set_default_dtype(torch.bfloat16)  # build directly in bf16 (no float32 detour)
        model = Transformer(config)
        own = {n: p for n, p in model.state_dict().items()}
        for file in sorted(Path(path).glob("*.safetensors")):
            shard = {k.removeprefix("model."): v for k, v in load_file(file).items()}
            for name, tensor in shard.items():
                own[name].copy_(tensor)
            del shard
    elif scenario in ("int8", "int4"):
        from illada.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path, dtype=torch.float32, quantize=scenario)
    else:
        from illada.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path, dtype=torch.float32 if scenario == "fp32" else None)
    seconds = time.perf_counter() - start
    after_load = _peak()
    from illada.quantize import storage_bytes, touch

    params = {id(p): p for p in model.parameters()}.values()
    with torch.no_grad():
        for p in params:
            touch(p)  # reads every page of the parameter
    weights = sum(storage_bytes(p) for p in params)
    print(json.dumps({"scenario": scenario, "weights": weights, "baseline": baseline, "load": after_load,
                      "touched": _peak(), **_resident(), "seconds": seconds}))


def describe(args) -> None:
    """Print the shape as JSON (runs in a subprocess, like everything that imports torch)."""
    from illada.model import build_model

    config = model_config(args)
    print(json.dumps({"layers": config.n_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                      "vocab": config.vocab_size, "params": build_model(config, device="meta").num_parameters()}))


def subprocess_json(extra: list[str], args_argv: list[str]) -> dict:
    """Run this script in a fresh interpreter. The parent never imports torch: ru_maxrss survives fork/exec
    on Linux, so a heavy parent would inflate every child's peak."""
    out = subprocess.run([sys.executable, __file__, *args_argv, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child(args.child, args.scenario)
    if args.write:
        print(json.dumps({"bytes": write_checkpoint(model_config(args), Path(args.write), int(args.shard_gb * 2**30))}))
        return None
    if args.scenario == "describe":
        return describe(args)
    shape_argv = [a for a in argv if a != "--keep"]
    shape = subprocess_json(["--scenario", "describe"], shape_argv)
    disk_bytes = 2 * shape["params"]
    scenarios = [s for s in args.scenarios.split(",") if s]
    root = Path(args.dir or tempfile.gettempdir())
    free_disk, free_ram = shutil.disk_usage(root).free, mem_available()
    print(f"shape {args.shape}: {shape['layers']} layers, hidden {shape['hidden']}, ffn {shape['ffn']}, "
          f"vocab {shape['vocab']}: {shape['params'] / 1e9:.2f}B parameters, {disk_bytes / 2**30:.2f} GiB bf16; "
          f"free disk {free_disk / 2**30:.0f} GiB, available RAM {free_ram / 2**30:.1f} GiB")
    if disk_bytes * 1.1 > free_disk:
        raise SystemExit("not enough free disk for the synthetic checkpoint")
    need = {"stored": 1.3 * disk_bytes, "fp32": 2.6 * disk_bytes, "naive": 1.6 * disk_bytes,
            "int8": 0.8 * disk_bytes, "int4": 0.6 * disk_bytes}
    skipped = [s for s in scenarios if need[s] > 0.9 * free_ram]
    scenarios = [s for s in scenarios if s not in skipped]
    for s in skipped:
        print(f"skipping {s}: needs ~{need[s] / 2**30:.0f} GiB of RAM")

    path = Path(tempfile.mkdtemp(prefix="illada-load-memory-", dir=root))
    try:
        start = time.perf_counter()
        subprocess_json(["--write", str(path)], shape_argv)
        shards = len(list(path.glob("*.safetensors")))
        print(f"wrote {shards} shards to {path} in {time.perf_counter() - start:.0f} s")
        gib = 2**30
        print(f"{'scenario':<8} {'weights':>10} {'baseline':>10} {'load':>10} {'touched':>10} {'anon':>10} "
              f"{'file':>10} {'ratio':>6} {'seconds':>8}")
        results = {}
        for scenario in scenarios:
            r = results[scenario] = subprocess_json(["--child", str(path), "--scenario", scenario], shape_argv)
            ratio = (r["touched"] - r["baseline"]) / r["weights"]
            print(f"{scenario:<8} {r['weights'] / gib:>9.2f}G {r['baseline'] / gib:>9.2f}G {r['load'] / gib:>9.2f}G "
                  f"{r['touched'] / gib:>9.2f}G {r['anon'] / gib:>9.2f}G {r['file'] / gib:>9.2f}G {ratio:>6.2f} "
                  f"{r['seconds']:>8.1f}", flush=True)
        quantised = [s for s in ("int8", "int4") if s in results]
        if "stored" in results and quantised:
            base = results["stored"]["touched"] - results["stored"]["baseline"]
            targets = {"int8": 0.6, "int4": 0.35}
            print(f"\npeak RSS above baseline (after touching every weight), vs bf16 ({base / gib:.2f}G)")
            print(f"{'scenario':<8} {'peak':>10} {'x bf16':>7} {'target':>7}")
            for s in quantised:
                peak = results[s]["touched"] - results[s]["baseline"]
                print(f"{s:<8} {peak / gib:>9.2f}G {peak / base:>7.2f} {'<= ' + str(targets[s]):>7}"
                      f" {'ok' if peak / base <= targets[s] else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
