"""The training loop shared by `illada train` (pre-training, `--objective ar`) and `illada sft`.

Exact resume: the batch rows and the masking noise of every micro-batch are functions of (seed, step, micro-batch
index) (see batches.py), and model/optimizer/scheduler state is restored from a full state dict, so a stopped and
resumed run reproduces the uninterrupted one, also across a change of world size.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from illada.config import ModelConfig, preset
from illada.errors import IlladaError
from illada.files import write_atomic
from illada.model import Transformer, build_model
from illada.runtime import resolve_device
from illada.training.batches import BatchPlan, PackedRows, PairRows, micro_batch_seed
from illada.training.checkpointing import (Checkpointer, CorruptCheckpoint, clean_staging, latest_checkpoint,
                                          load_training_checkpoint, newest_intact, save_training_checkpoint)
from illada.training.config import TrainConfig
from illada.training.lr_schedule import build_schedule, set_lr
from illada.training.metrics import TrainMetrics, default_peak_flops, flops_per_token
from illada.training.parallelize import DistEnv, init_distributed, parallelize
from illada.training.stopping import StopRequest
from illada.training.validate import Validator


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: list[float]              # training loss of every step run in this call (nan for skipped steps)
    val_loss: float | None
    checkpoint: Path | None
    stopped_early: bool = False


def build_schedule_for(cfg: TrainConfig):
    kw = dict(peak_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    if cfg.schedule == "cosine":
        kw["switch_step"] = cfg.switch_step if cfg.switch_step is not None else int(0.8 * cfg.steps)
    elif cfg.schedule in ("wsd", "linear-tail"):
        kw["decay_fraction"] = cfg.decay_fraction
    return build_schedule(cfg.schedule, **kw)


def param_groups(model: Transformer, weight_decay: float, exempt_norms_embeddings: bool) -> list[dict]:
    """AdamW groups: no weight decay on norms and embeddings (the tied head included) when exempted."""
    decay, no_decay = [], []
    embedding = model.embed_tokens.weight
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the frozen base of a LoRA run
            continue
        if exempt_norms_embeddings and (param.ndim < 2 or param is embedding):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_objective(cfg: TrainConfig, model_config: ModelConfig):
    from illada.diffusion import objective as obj

    if cfg.objective == "ar":
        return obj.AutoregressiveObjective(split_prob=cfg.split_prob)
    if model_config.mask_token_id is None:
        raise IlladaError("the model has no mask_token_id (set it in the tokenizer or model_overrides)")
    if cfg.objective == "sft-blocks":
        return obj.BlockCausalSFTObjective(mask_id=model_config.mask_token_id, block_length=cfg.block_length,
                                           eps=cfg.mask_eps)
    if cfg.objective == "sft-pairs":
        return obj.SFTPairsObjective(mask_id=model_config.mask_token_id, eps=cfg.mask_eps,
                                     clean_prefix_prob=cfg.clean_prefix_prob,
                                     clean_prefix_block=cfg.clean_prefix_block)
    return obj.DiffusionObjective(mask_id=model_config.mask_token_id, eps=cfg.mask_eps, split_prob=cfg.split_prob,
                                  truncate_prob=cfg.truncate_prob)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.env: DistEnv = init_distributed(self.device.type)
        if self.env.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.env.local_rank)
        self.out_dir = Path(cfg.out_dir)
        self.stop_request = StopRequest(self.env, self.device)
        self._setup_data()
        self._setup_model()

    # ----------------------------------------------------------------------------------------------------- setup
    def _setup_data(self) -> None:
        from illada.data.shards import PackedTokens, open_dataset

        cfg = self.cfg
        dataset = open_dataset(cfg.data)
        self.tokenizer_source = dataset.manifest.get("tokenizer")
        copied = dataset.manifest.get("tokenizer_dir")
        if copied and (Path(cfg.data) / copied).is_dir():
            # prepare stores a copy of the tokenizer beside the shards: the data stays usable if the original moves
            self.tokenizer_source = str(Path(cfg.data) / copied)
        holdout = 0 if cfg.val_data else cfg.val_rows

        def rows_of(data, path: str, holdout: int) -> PackedRows | PairRows:
            if cfg.objective == "ar" and not isinstance(data, PackedTokens):
                return PairRows(data, cfg.seq_len, holdout)  # AR SFT: the twin of an sft-pairs run
            if cfg.objective in ("sft-pairs", "sft-blocks"):
                if isinstance(data, PackedTokens):
                    raise IlladaError(f"objective {cfg.objective} needs a 'pairs' dataset "
                                      "(illada prepare --kind sft --sft-format pairs)")
                return PairRows(data, cfg.seq_len, holdout)
            if not isinstance(data, PackedTokens):
                raise IlladaError(f"objective {cfg.objective} needs a packed dataset; {path} holds prompt/response pairs")
            return PackedRows(data, cfg.seq_len, holdout)

        self.rows = rows_of(dataset, cfg.data, holdout)
        self.val_source = self.rows
        if cfg.val_data:
            self.val_source = rows_of(open_dataset(cfg.val_data), cfg.val_data, 0)
            self.val_source.holdout, self.val_source.train_rows = self.val_source.train_rows, 0
        self.vocab_size = dataset.manifest["vocab_size"]
        self.eos_token_id = dataset.eos_token_id
        self.global_batch = self.env.world_size * cfg.grad_accum * cfg.micro_batch_size
        self.plan = BatchPlan(self.rows.train_rows, self.global_batch, cfg.seed)

    def _load_tokenizer(self):
        from illada.tokenizer import Tokenizer, byte_level_tokenizer

        source = self.tokenizer_source
        if self.cfg.init_from:
            return Tokenizer.from_dir(self.init_path)
        if source in (None, "bytes"):
            return byte_level_tokenizer()
        if not Path(source).is_dir():
            raise IlladaError(f"the dataset's tokenizer {source!r} is not a directory on this machine")
        return Tokenizer.from_dir(source)

    def _setup_model(self) -> None:
        from illada.checkpoint import load_checkpoint

        cfg = self.cfg
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        if cfg.quantize:  # bitsandbytes and its 4-bit layers on this device, before anything is loaded
            from illada.qlora import check_backend

            check_backend(cfg.quantize, self.device, torch.bfloat16 if use_bf16 else torch.float32)
        if cfg.init_from:  # a checkpoint, a run directory (its newest checkpoint), a bundled name or a hub id
            from illada.sources import resolve_model_dir

            self.init_path = resolve_model_dir(cfg.init_from, "--init-from")
        self.tokenizer = self._load_tokenizer()
        causal = cfg.objective == "ar"
        if cfg.init_from:
            model, model_config = load_checkpoint(self.init_path, device="cpu", dtype=torch.float32)
            if cfg.adapt_causal:
                if not model_config.causal:
                    raise IlladaError(f"adapt_causal: {cfg.init_from} is already bidirectional")
                # the same weights, attention opened both ways: the diffusion objective then adapts them
                model_config = model_config.replace(causal=False, shift_logits=cfg.adapt_shift,
                                                    name=f"{model_config.name}-adapted-{cfg.objective}")
                model.config = model_config
            if model_config.causal != causal:
                raise IlladaError(f"{cfg.init_from} is {'causal' if model_config.causal else 'bidirectional'}; "
                                  f"objective {cfg.objective} needs the other kind")
            if model_config.block_causal and cfg.objective != "sft-blocks":
                raise IlladaError(f"{cfg.init_from} is block-causal: it trains with --objective sft-blocks only")
        else:
            overrides = dict(cfg.model_overrides)
            overrides.setdefault("vocab_size", self.tokenizer.vocab_size)
            overrides.setdefault("max_seq_len", max(cfg.seq_len, preset(cfg.preset).max_seq_len))
            for key in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
                overrides.setdefault(key, getattr(self.tokenizer, key))
            model_config = preset(cfg.preset, causal=causal, name=f"{cfg.preset}-{cfg.objective}", **overrides)
            model = build_model(model_config, device="cpu", seed=cfg.seed)
        if cfg.objective == "sft-blocks" and not model_config.block_causal:
            # the attention the objective trains is the attention the sampler will use: say so in config.json
            model_config = model_config.replace(block_causal=True, name=f"{model_config.name}-block-causal")
            model.config = model_config
        if model_config.vocab_size < self.vocab_size:
            raise IlladaError(f"dataset vocabulary ({self.vocab_size}) is larger than the model's ({model_config.vocab_size})")
        if cfg.seq_len > model_config.max_seq_len:
            raise IlladaError(f"seq_len {cfg.seq_len} exceeds the model context {model_config.max_seq_len}")
        self.model_config = model_config
        self.peft = None  # with --lora-r: the PeftModel around self.model, whose adapters alone are trained
        if cfg.lora_r:
            from illada.lora import wrap

            base_count = model.num_parameters()  # a 4-bit Params4bit's numel is its packed bytes
            if cfg.quantize:  # QLoRA: the projections become 4-bit bitsandbytes layers on the device (illada.qlora)
                from illada.qlora import quantize_base

                quantize_base(model, cfg.quantize, self.device, torch.bfloat16 if use_bf16 else torch.float32)
            self.peft = wrap(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                             base=str(Path(self.init_path).resolve()), seed=cfg.seed)
            if self.env.is_main:
                trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
                total = base_count + trained
                kind = f"QLoRA ({cfg.quantize} base)" if cfg.quantize else "LoRA"
                print(f"illada: {kind} r={cfg.lora_r} on {cfg.lora_targets}: {trained:,} trainable parameters "
                      f"({100 * trained / total:.2f}% of {total:,})", file=sys.stderr)
        self.model = model.to(self.device)
        self.wrapped = parallelize(self.model, cfg.distributed, self.env, self.device,
                                   activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, cfg.no_decay_norms_embeddings),
                                           lr=cfg.lr, betas=cfg.betas, fused=fused or None)
        self.schedule = build_schedule_for(cfg)
        self.objective = make_objective(cfg, model_config)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.flops_per_token = flops_per_token(model_config, cfg.seq_len)
        self.peak_flops = cfg.peak_tflops * 1e12 if cfg.peak_tflops else default_peak_flops(self.device.type)

    # ------------------------------------------------------------------------------------------------ state
    def _full_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # a LoRA run's state is its adapters: the frozen base is --init-from's, unchanged
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.peft is not None)
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer, options=options)
        if self.cfg.quantize:  # a 4-bit layer's quantisation state (absmax, ...) is no parameter: not dropped above
            model_state = {k: v for k, v in model_state.items() if ".lora_" in k}
        return model_state, optim_state

    def _restore(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state, training_state, trainer_state = load_training_checkpoint(path)
        from illada.lora import check_resume_mode, model_keys

        check_resume_mode(path, trainer_state, self.cfg.lora_r if self.peft is not None else 0, self.cfg.quantize,
                          "fine-tuning")
        if self.peft is not None:
            model_state = model_keys(model_state, self.model, str(path))
        if self.model_config.tie_word_embeddings:
            model_state.pop("lm_head.weight", None)
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=model_state,
                       optim_state_dict=training_state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        torch.set_rng_state(training_state["torch_rng"])
        if "cuda_rng" in training_state and self.device.type == "cuda":  # LoRA dropout on the GPU draws from it
            torch.cuda.set_rng_state(training_state["cuda_rng"], self.device)
        return trainer_state

    def _resume_point(self) -> Path | None:
        if self.cfg.resume_from is None:
            return latest_checkpoint(self.out_dir)
        path = Path(self.cfg.resume_from).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise IlladaError(f"--resume-from {path}: not a training checkpoint (no trainer_state.json)")
        return path

    def _restore_or_explain(self, path: Path) -> dict:
        try:
            return self._restore(path)
        except CorruptCheckpoint as error:
            step = _step_of(path)
            fallback = newest_intact(self.out_dir, below=step)
            hint = (f"; the newest intact checkpoint is {fallback}: resume from it with --resume-from {fallback}"
                    if fallback is not None else "; there is no intact older checkpoint to resume from")
            raise IlladaError(f"{error}{hint}") from None

    def _check_fresh_start(self) -> None:
        """Refuse to start over an earlier run's records: its metrics are never deleted implicitly."""
        metrics, saved = self.out_dir / "metrics.jsonl", self.out_dir / "train_config.json"
        if not metrics.exists():
            return
        same = False
        try:
            recorded = json.loads(saved.read_text(encoding="utf-8"))
            mine = json.loads(json.dumps(self.cfg.to_dict()))  # as written: tuples become lists
            same = {k: v for k, v in recorded.items() if k != "resume_from"} == \
                {k: v for k, v in mine.items() if k != "resume_from"}
        except (OSError, ValueError, AttributeError):
            pass
        if not same:
            raise IlladaError(f"{self.out_dir} holds an earlier run (metrics.jsonl) with a different or no "
                              f"train_config.json and no checkpoint to resume: choose another --out-dir, or move "
                              f"that run away yourself")

    def _elapsed(self) -> float:
        """Wall seconds of training over every session of this run (resumes add up)."""
        return self._seconds_before + time.perf_counter() - self._began

    def save(self, step: int, tokens: int, bad_steps: int) -> Path | None:
        model_state, optim_state = self._full_state()  # collective under FSDP: every rank takes part
        path = None
        if self.env.is_main:
            trainer_state = {"step": step, "tokens": tokens, "consecutive_bad_steps": bad_steps,
                             "train_seconds": round(self._elapsed(), 3),
                             "world_size": self.env.world_size, "global_batch": self.global_batch,
                             "data_position": {"step": step, "rows_consumed": step * self.global_batch}}
            training_state = {"optimizer": optim_state, "torch_rng": torch.get_rng_state()}
            if self.device.type == "cuda":
                training_state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            if self.peft is not None:
                trainer_state["lora"] = True
            if self.cfg.quantize:
                trainer_state["quantize"] = self.cfg.quantize
            path = save_training_checkpoint(self.out_dir, step, model_state, training_state, trainer_state,
                                            self.model_config, self.cfg.to_dict(), tokenizer=self.tokenizer,
                                            keep=self.cfg.keep_checkpoints, adapter=self.peft)
        if self.env.enabled:
            dist.barrier()
        return path

    # ------------------------------------------------------------------------------------------------- steps
    def _set_lr(self, step: int) -> float:
        lr = float(self.schedule(step))
        set_lr(self.optimizer, lr)
        return lr

    def _micro_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in self.rows.batch(rows).items()}

    def train_step(self, step: int) -> tuple[float, dict, int]:
        """One optimizer step; returns (mean loss over the global batch, stats, tokens). Skips the update on NaN/inf."""
        cfg, env = self.cfg, self.env
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens, stats = torch.zeros((), device=self.device), 0, {}
        for k in range(cfg.grad_accum):
            rows = self.plan.micro_rows(step, env.rank, cfg.grad_accum, cfg.micro_batch_size, k)
            batch = self._micro_batch(rows)
            generator = torch.Generator(device=self.device).manual_seed(
                micro_batch_seed(cfg.seed, step, env.rank * cfg.grad_accum + k))
            sync = contextlib.nullcontext()
            if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) and k < cfg.grad_accum - 1:
                sync = self.wrapped.no_sync()
            with sync:
                with self.autocast:
                    loss, stats = self.objective(self.wrapped, batch, generator)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
            tokens += batch["input_ids"].numel()
        if env.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(total).item() and torch.isfinite(grad_norm).item())
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        stats = {k: (v.item() if torch.is_tensor(v) else v) for k, v in stats.items()}
        stats["grad_norm"] = float(grad_norm.item())
        stats["finite"] = finite
        return float(total.item()), stats, tokens * env.world_size

    # -------------------------------------------------------------------------------------------------- loop
    def _resume(self) -> tuple[int, int, int, Path | None]:
        """(step, tokens, consecutive bad steps, checkpoint) to continue from: the latest checkpoint in out_dir (or
        --resume-from), else a fresh start (0, 0, 0, None) after checking that out_dir holds no other run."""
        start, tokens, bad_steps = 0, 0, 0
        self._seconds_before, self._began = 0.0, time.perf_counter()
        if self.env.is_main:
            for path in clean_staging(self.out_dir):
                print(f"illada: removed {path}, the staging directory of a save that was killed", file=sys.stderr)
        resume = self._resume_point()
        if resume is not None:
            state = self._restore_or_explain(resume)
            start, tokens, bad_steps = state["step"], state["tokens"], state.get("consecutive_bad_steps", 0)
            self._seconds_before = float(state.get("train_seconds", 0.0))
            if self.env.is_main:
                print(f"illada: resuming from {resume} (step {start})", file=sys.stderr)
        else:
            if self.env.is_main:
                self._check_fresh_start()
            if self.peft is not None:  # LoRA dropout draws from the global generators: a fresh run seeds them
                torch.manual_seed(self.cfg.seed + self.env.rank)
        return start, tokens, bad_steps, resume

    def _count_bad_step(self, finite: bool, bad_steps: int, done: int, last_ckpt: Path | None) -> int:
        """Consecutive non-finite steps after step `done`; `max_bad_steps` of them stop the run."""
        bad_steps = 0 if finite else bad_steps + 1
        if bad_steps:
            if self.env.is_main:
                print(f"illada: step {done}: non-finite loss/gradients, update skipped ({bad_steps} in a row)",
                      file=sys.stderr)
            if bad_steps >= self.cfg.max_bad_steps:
                raise IlladaError(f"training stopped: {bad_steps} consecutive non-finite steps at step {done}; "
                                  f"last good checkpoint: {last_ckpt or 'none'} (lower the lr or check the data)")
        return bad_steps

    def _record_config(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2))

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train from the latest checkpoint in out_dir (or from scratch) up to cfg.steps (or `max_steps` in this call).

        Each step: train, then the metrics, validation and checkpoint components each decide whether their step
        is due (log_every, eval_every, save_every / the end / a stop request)."""
        cfg, main = self.cfg, self.env.is_main
        start, tokens, bad_steps, resume = self._resume()
        # a fresh run records its config once its first step has worked: a run that cannot even take one step
        # (out of memory, bad data) leaves no train_config.json behind to make the directory look used
        config_pending = resume is None and main
        end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
        metrics = TrainMetrics(self.out_dir, main=main, log_every=cfg.log_every, start=start, end=end,
                               total=cfg.steps, tokens=tokens, progress=cfg.progress,
                               flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                               elapsed=self._elapsed, title=f"{cfg.objective} · {self.model_config.name}",
                               exact_likelihood=cfg.objective == "ar")
        validator = Validator(cfg, self.val_source, self.model, self.wrapped, self.objective,
                              self.model_config.mask_token_id, self.device, self.autocast, metrics)
        checkpointer = Checkpointer(self.save, cfg.save_every, end, last=resume)
        losses: list[float] = []
        stopped = False
        self.model.train()
        with self.stop_request.installed():
            try:
                for step in range(start, end):
                    lr = self._set_lr(step)
                    loss, stats, step_tokens = self.train_step(step)
                    if config_pending:
                        self._record_config()
                        config_pending = False
                    tokens += step_tokens
                    losses.append(loss if stats["finite"] else float("nan"))
                    done = step + 1
                    bad_steps = self._count_bad_step(stats["finite"], bad_steps, done, checkpointer.last)
                    metrics.log_step(done, loss, lr, tokens, stats)
                    validator.maybe_run(done)
                    stop = self.stop_request.agreed()
                    checkpointer.maybe_save(done, tokens, bad_steps, stop=stop)
                    if stop:
                        stopped = True
                        break
            finally:
                metrics.close()
        metrics.plot()
        return TrainResult(self.out_dir, start + len(losses), losses, validator.last, checkpointer.last, stopped)


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _out_of_memory(error: BaseException, cfg: TrainConfig, doing: str) -> BaseException:
    """An allocation failure (host or device) as one IlladaError naming the sizes to lower; other errors as they are."""
    text = str(error)
    if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return error
    return IlladaError(f"out of memory {doing} with micro_batch_size {cfg.micro_batch_size} x seq_len {cfg.seq_len} "
                       f"on {cfg.device}: lower --micro-batch-size (raise --grad-accum to keep the batch) or "
                       f"--seq-len")


def train(cfg: TrainConfig, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) a training run described by `cfg`; the Python entry point behind `illada train`/`sft`."""
    try:
        trainer = Trainer(cfg)
    except (MemoryError, RuntimeError) as error:
        raise _out_of_memory(error, cfg, "building the model") from None
    try:
        return trainer.run(max_steps=max_steps)
    except (MemoryError, RuntimeError) as error:
        raise _out_of_memory(error, cfg, "training") from None
    finally:
        if trainer.env.enabled and dist.is_initialized():
            dist.destroy_process_group()
