"""`illada rl`: GRPO-family RL with verifiable rewards for a masked diffusion model.

One step: `prompts_per_step` prompts (a seeded draw per step), `group_size` rollouts each with the project's sampler
(temperature > 0; threshold/cache as configured), rewards, group-normalised advantages, then `inner_updates`
optimizer steps on the clipped surrogate of the chosen log-likelihood estimator (masks drawn once per step and shared
by the old policy, the new policy and the reference). The prompts, rollouts and masks of step k depend only on
(seed, k) and the weights, so a resumed run repeats the uninterrupted one exactly. Checkpoints are the training
checkpoints of `illada train` (atomic, model + optimizer + state) and load as models.

With `lora_r` > 0 the policy is the init_from model with PEFT LoRA adapters (B zero at step 0: the base exactly),
only they are trained and checkpointed (PEFT's format, as `illada sft --lora-r` writes it; `--adapter` and `illada
merge` take the run), and the KL reference is the same base with the adapters switched off (PEFT's
`disable_adapter()`): no second copy of the weights is held. The inner updates draw LoRA dropout from a generator
seeded by (seed, step, rank), so resume stays exact with dropout too. With `quantize` (nf4|fp4: QLoRA, illada.qlora)
the base's projections are bitsandbytes 4-bit layers, quantised one by one from a CPU load onto the device, and
compute in bf16 on CUDA (fp32 on CPU); the KL reference is then that 4-bit base.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from illada.errors import IlladaError
from illada.rl.config import RLConfig
from illada.rl.estimators import ScoredBatch, get_estimator
from illada.rl.grpo import group_advantages, policy_loss, token_policy_loss
from illada.rl.rewards import build_rewards
from illada.training.checkpointing import (clean_staging, latest_checkpoint, load_training_checkpoint,
                                          save_training_checkpoint)
from illada.training.metrics import MetricsLog, Progress
from illada.training.parallelize import apply_ddp, init_distributed
from illada.training.stopping import StopRequest, any_rank


@dataclass
class RLResult:
    out_dir: Path
    step: int
    checkpoint: Path | None
    history: list[dict]
    stopped: bool


def _resolve_checkpoint(path: str) -> Path:
    """--init-from: a checkpoint, a run directory (its newest checkpoint), a bundled name or a hub id."""
    from illada.sources import resolve_model_dir

    found = resolve_model_dir(path, "rl: --init-from")
    if not (found / "config.json").is_file():
        raise IlladaError(f"rl: --init-from {path}: not a checkpoint or a run directory with one")
    return found


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class RLTrainer:
    def __init__(self, cfg: RLConfig) -> None:
        import illada
        from illada.evaluation.tasks import load_samples

        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        # the cheap checks first: a bad reward spec or data file fails before any model is loaded
        self.rewards = build_rewards(cfg.rewards)
        options = {"mean_field": {"prompt_mask_prob": cfg.prompt_mask_prob}, "elbo": {"samples": cfg.elbo_samples}}
        self.estimator = get_estimator(cfg.estimator, **options.get(cfg.estimator, {}))
        self.init_path = _resolve_checkpoint(cfg.init_from)
        from illada.runtime import resolve_device

        device = resolve_device(cfg.device)
        self.env = init_distributed(device.type)
        if self.env.enabled and device.type == "cuda":
            device = torch.device("cuda", self.env.local_rank)
        if cfg.prompts_per_step % self.env.world_size:
            raise IlladaError(f"rl: prompts_per_step ({cfg.prompts_per_step}) must divide among "
                              f"{self.env.world_size} processes")
        compute = torch.float32 if device.type == "cpu" else torch.bfloat16  # QLoRA's (no autocast in rl)
        if cfg.quantize:  # bitsandbytes and its 4-bit layers on this device, before anything is loaded
            from illada.qlora import check_backend

            check_backend(cfg.quantize, device, compute)
        # QLoRA loads on the CPU: its projections go to the device one by one, in 4 bits (illada.qlora)
        self.lm = illada.load(self.init_path, device="cpu" if cfg.quantize else device,
                              dtype=compute if cfg.quantize else None)
        if self.lm.config.causal:
            raise IlladaError("rl: the model is causal (autoregressive); illada rl trains masked diffusion models")
        if self.lm.config.block_causal:
            raise IlladaError("rl: the model is block-causal; the RL estimators score bidirectional masked diffusion "
                              "models (train it with --objective sft-blocks)")
        self.model = self.lm.model
        self.peft = None  # with lora_r: the PeftModel around self.model (adapters injected in place), its base frozen
        self.reference = None  # without LoRA: a frozen copy of the start checkpoint, the KL reference
        if cfg.lora_r:
            from illada.lora import wrap

            base_count = self.model.num_parameters()  # a 4-bit Params4bit's numel is its packed bytes
            if cfg.quantize:
                from illada.qlora import quantize_base

                quantize_base(self.model, cfg.quantize, device, compute).to(device)
            self.peft = wrap(self.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                             base=str(self.init_path.resolve()), seed=cfg.seed)
            if self.env.is_main:
                trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                total = base_count + trained
                kind = f"QLoRA ({cfg.quantize} base)" if cfg.quantize else "LoRA"
                print(f"illada: {kind} r={cfg.lora_r} on {cfg.lora_targets}: {trained:,} trainable parameters "
                      f"({100 * trained / total:.2f}% of {total:,}); the KL reference is the base, adapters off",
                      file=sys.stderr)
        else:
            self.reference = illada.load(self.init_path, device=device).model.eval().requires_grad_(False)
        self.wrapped = apply_ddp(self.model, self.env, device) if self.env.enabled else self.model
        self.samples = load_samples(cfg.data, cfg.task)
        if len(self.samples) < cfg.prompts_per_step:
            raise IlladaError(f"rl: {cfg.data} has {len(self.samples)} records, fewer than prompts_per_step "
                              f"({cfg.prompts_per_step})")
        self.eval_samples = load_samples(cfg.eval_data, cfg.task)[: cfg.eval_limit] if cfg.eval_data else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters alone
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.99))
        self.stop_request = StopRequest(self.env, device)

    # ----------------------------------------------------------------------------------------------- pieces
    def prompts_for(self, step: int) -> list[int]:
        """This rank's prompts of `step`: every world_size-th of the step's seeded draw."""
        rng = np.random.default_rng(_seed(self.cfg.seed, step, 11))
        chosen = rng.choice(len(self.samples), size=self.cfg.prompts_per_step, replace=False).tolist()
        return chosen[self.env.rank::self.env.world_size]

    def prompt_text(self, sample: dict) -> str:
        """The prompt exactly as `illada eval` (0-shot) puts it to the model."""
        from illada.evaluation.tasks import gsm8k_prompt

        return gsm8k_prompt(sample, []) if self.cfg.task == "gsm8k" else sample["prompt"]

    def rollouts(self, step: int, indices: list[int]):
        """Texts, prompt token lists, completion token lists (EOS kept where the rollout ended) and the output."""
        cfg, tok = self.cfg, self.lm.tokenizer
        texts = [self.prompt_text(self.samples[i]) for i in indices for _ in range(cfg.group_size)]
        self.model.eval()
        completions, output = self.lm.generate(
            texts, return_output=True, max_new_tokens=cfg.max_new_tokens, block_length=cfg.block_length,
            steps=cfg.sampling_steps, temperature=cfg.temperature, variable_length=True, threshold=cfg.threshold,
            cache=cfg.cache, seed=_seed(cfg.seed, step, 23, self.env.rank))
        eos = self.lm.special.eos
        prompt_ids = [list(tok.encode(t)) for t in texts]
        tokens = []
        for row in output.generated_tokens():
            ended = len(row) < cfg.max_new_tokens and eos is not None
            tokens.append(list(row) + ([eos] if ended else []) or [eos])
        return completions, prompt_ids, tokens, output

    def evaluate(self) -> float | None:
        if not self.eval_samples:
            return None
        from illada.evaluation import evaluate, get_preset

        preset = get_preset(self.cfg.task).replace(num_fewshot=0, max_new_tokens=self.cfg.max_new_tokens,
                                              block_length=self.cfg.block_length, steps=self.cfg.sampling_steps)
        self.model.eval()
        result = evaluate(self.lm, preset, self.eval_samples, batch_size=32, progress=False)
        return result.score

    def step(self, step: int) -> dict:
        cfg = self.cfg
        began = time.perf_counter()
        indices = self.prompts_for(step)
        samples = [self.samples[i] for i in indices for _ in range(cfg.group_size)]
        completions, prompt_ids, tokens, output = self.rollouts(step, indices)
        rollout_seconds = time.perf_counter() - began
        totals, parts = self.rewards.score(completions, samples)
        rewards = torch.tensor(totals)
        advantages = group_advantages(rewards, cfg.group_size).to(self.lm.device)
        batch = ScoredBatch.from_lists(prompt_ids, tokens, self.lm.pad_token_id, self.lm.device)
        mask_id = self.lm.mask_token_id
        masks = self.estimator.draw(batch, torch.Generator().manual_seed(_seed(cfg.seed, step, 37, self.env.rank)))
        with torch.no_grad():
            old = self.estimator.token_terms(self.model, batch, masks, mask_id)
            ref = self._reference_terms(batch, masks, mask_id)
            entropy = self._entropy(batch, mask_id)
        lengths = batch.completion_lengths
        self.model.train()
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the statistics of the policy as it is (KL to the reference measured even when nothing is updated)
        loss, stats = self._loss(old, old, advantages, batch, ref)
        stats["updated"], grad_norm = 0.0, 0.0
        # a batch whose every group has equal rewards carries no signal (and no KL term pulls): no optimizer step,
        # since Adam's momentum would otherwise keep moving the weights on a zero gradient
        informative = any_rank(bool(advantages.abs().max() > 0) or cfg.kl_coef > 0, self.env,
                               self.lm.device)
        devices = [self.lm.device] if self.lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # LoRA dropout: its noise is a function of (seed, step, rank)
            torch.manual_seed(_seed(cfg.seed, step, 41, self.env.rank))
            for _ in range(cfg.inner_updates if informative else 0):
                new = self.estimator.token_terms(self.wrapped, batch, masks, mask_id)
                loss, stats = self._loss(new, old, advantages, batch, ref)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip))
                if not math.isfinite(grad_norm):
                    raise IlladaError(f"rl: non-finite gradients at step {step + 1}; lower the lr")
                self.optimizer.step()
                stats["updated"] = 1.0
        rows = output.row_nfe.float().clamp(min=1) if output.row_nfe is not None else torch.ones(len(tokens))
        per_rollout = {"reward": rewards, "completion_tokens": lengths.float().cpu(),
                       "tokens_per_forward": output.generated_lengths.float().cpu() / rows.cpu(),
                       **{f"reward/{name}": torch.tensor(values) for name, values in parts.items()}}
        per_rollout = {k: self._gather(v) for k, v in per_rollout.items()}  # every rank's rollouts
        scalars = self._mean({"loss": float(loss.detach()), "grad_norm": grad_norm, "entropy": entropy, **stats})
        all_rewards = per_rollout.pop("reward")
        record = {"kind": "rl", "step": step + 1, "rollouts": int(all_rewards.numel()),
                  "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                  "lr": lr, **scalars, **{k: float(v.mean()) for k, v in per_rollout.items()},
                  "rollout_s": round(rollout_seconds, 3), "step_s": round(time.perf_counter() - began, 3)}
        for name in ("exact_answer", "exact_match"):
            if f"reward/{name}" in record:
                record["accuracy"] = record[f"reward/{name}"]
        return record

    def _reference_terms(self, batch: ScoredBatch, masks: list[torch.Tensor], mask_id: int) -> torch.Tensor:
        """The reference's per-position terms: the frozen copy, or with LoRA the base with its adapters off."""
        if self.peft is None:
            return self.estimator.token_terms(self.reference, batch, masks, mask_id)
        with self.peft.disable_adapter():
            return self.estimator.token_terms(self.model, batch, masks, mask_id)

    def _loss(self, new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, batch: ScoredBatch,
              ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured surrogate from per-position terms: a sequence ratio from their sums, or one per token."""
        cfg = self.cfg
        if cfg.ratio == "token":
            return token_policy_loss(new, old, advantages, batch.completion, clip=cfg.clip, ref=ref,
                                     kl_coef=cfg.kl_coef)
        return policy_loss(new.sum(dim=1), old.sum(dim=1), advantages, batch.completion_lengths, clip=cfg.clip,
                           ref=ref.sum(dim=1), kl_coef=cfg.kl_coef)

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        if not self.env.enabled:
            return values.float()
        out = [torch.zeros_like(values.float()) for _ in range(self.env.world_size)]
        dist.all_gather(out, values.float().contiguous())
        return torch.cat(out)

    def _mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.env.enabled:
            return values
        keys = sorted(values)
        flat = torch.tensor([float(values[k]) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.env.world_size for k, v in zip(keys, flat)}

    def _entropy(self, batch: ScoredBatch, mask_id: int) -> float:
        """Mean entropy (nats) of the policy's predictions at the completion positions, all of them masked."""
        noisy = torch.where(batch.completion, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
        logp = torch.log_softmax(self.model(noisy, attention_mask=batch.attention_mask).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return float((entropy * batch.completion).sum() / batch.completion.sum().clamp(min=1))

    # ------------------------------------------------------------------------------------------------ loop
    def save(self, step: int, history_tail: dict | None) -> Path:
        if self.peft is not None:  # the adapters alone: the base is init_from's, unchanged
            state = {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}
        else:
            state = {name: p.detach().clone() for name, p in self.model.state_dict().items()}
        training_state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        trainer_state = {"step": step, "tokens": 0, "kind": "rl", "init_from": str(self.init_path),
                         "last": history_tail}
        if self.peft is not None:
            trainer_state["lora"] = True
        if self.cfg.quantize:
            trainer_state["quantize"] = self.cfg.quantize
        return save_training_checkpoint(self.out_dir, step, state, training_state, trainer_state,
                                        self.lm.config, self.cfg.to_dict(), tokenizer=self.lm.tokenizer,
                                        keep=self.cfg.keep_checkpoints, adapter=self.peft)

    def restore(self, path: Path) -> int:
        model_state, training_state, trainer_state = load_training_checkpoint(path)
        from illada.lora import check_resume_mode, model_keys

        check_resume_mode(path, trainer_state, self.cfg.lora_r if self.peft is not None else 0, self.cfg.quantize,
                          "RL", prefix="rl: ")
        if self.peft is not None:

            model_state = model_keys(model_state, self.model, str(path))
        try:
            self.model.load_state_dict(model_state, strict=False)
        except RuntimeError as error:  # another --lora-r: the adapters' shapes differ
            detail = " ".join(str(error).split())[:200]
            raise IlladaError(f"rl: {path} does not fit this run's model or LoRA settings ({detail})") from None
        self.optimizer.load_state_dict(training_state["optimizer"])
        torch.set_rng_state(training_state["torch_rng"])
        return int(trainer_state["step"])

    def run(self, max_steps: int | None = None) -> RLResult:
        cfg, main = self.cfg, self.env.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_staging(self.out_dir)
        self._barrier()
        resume = latest_checkpoint(self.out_dir)
        start = self.restore(resume) if resume is not None else 0
        if resume is not None and main:
            print(f"illada: resuming RL from {resume} (step {start})", file=sys.stderr)
        log = MetricsLog(self.out_dir, resume_step=start) if main else None
        if main:
            (self.out_dir / "rl_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
        if start == 0 and self.eval_samples and main:
            log.write({"kind": "eval", "step": 0, "accuracy": self.evaluate()})
        self._barrier()
        last, record, stopped = resume, None, False
        progress = Progress("rl", cfg.steps, start, enabled=cfg.progress and main) if main else None
        with self.stop_request.installed():
            try:
                for step in range(start, end):
                    record = self.step(step)
                    done = step + 1
                    stop = self.stop_request.agreed()
                    if main:
                        if self.eval_samples and (done % cfg.eval_every == 0 or done == cfg.steps):
                            accuracy = self.evaluate()
                            log.write({"kind": "eval", "step": done, "accuracy": accuracy})
                            record["eval_accuracy"] = accuracy
                        if done % cfg.log_every == 0 or done == end:
                            log.write(record)
                            progress.update(done, _summary(record))
                        if done % cfg.save_every == 0 or done == end or stop:
                            last = self.save(done, record)
                            plot_rl(log.records(), self.out_dir / "rl.png")
                    self._barrier()
                    if stop:
                        stopped = True
                        break
            finally:
                if progress is not None:
                    progress.close()
                if self.env.enabled and dist.is_initialized():
                    dist.destroy_process_group()
        history = log.records() if log else []
        return RLResult(self.out_dir, (record or {}).get("step", start), last, history, stopped)

    def _barrier(self) -> None:
        if self.env.enabled:
            dist.barrier()


def _summary(record: dict) -> str:
    parts = [f"reward {record['reward_mean']:.3f}±{record['reward_std']:.3f}"]
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']:.3f}")
    if record.get("eval_accuracy") is not None:
        parts.append(f"held-out {record['eval_accuracy']:.3f}")
    return " · ".join(parts + [f"kl {record.get('kl', 0):.4f}", f"{record['step_s']:.1f} s"])


def plot_rl(records: list[dict], path: Path) -> None:
    """PNG of the rollout reward and accuracy per step and the held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [r for r in records if r.get("kind") == "rl"]
    ev = [r for r in records if r.get("kind") == "eval" and r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if rl:
        ax.plot([r["step"] for r in rl], [r["reward_mean"] for r in rl], alpha=0.6, label="rollout reward")
    if ev:
        ax.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def train_rl(cfg: RLConfig, max_steps: int | None = None) -> RLResult:
    """Run (or resume) `illada rl`; the Python entry point."""
    return RLTrainer(cfg).run(max_steps=max_steps)
