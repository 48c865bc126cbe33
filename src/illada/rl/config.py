"""The typed configuration of `illada rl` (YAML/JSON file + flags; every field is a flag)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from illada.config import type_mismatch
from illada.errors import IlladaError
from illada.lora import TARGETS as LORA_TARGETS, check_settings as check_lora
from illada.qlora import check_settings as check_qlora


@dataclass
class RLConfig:
    init_from: str = ""  # checkpoint (or run directory: its latest checkpoint) to start from; also the KL reference
    # LoRA (the `lora` extra, PEFT): train only low-rank adapters on the frozen init_from model; the KL reference is
    # then that base itself (the adapters switched off), not a second copy
    lora_r: int = 0  # LoRA rank; 0: off (the whole model is trained). Checkpoints then hold only the adapters, in PEFT's format
    lora_alpha: int = 16  # LoRA scale: the update is (lora_alpha / lora_r) B A
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ",".join(LORA_TARGETS)  # comma-separated Linear layers that get adapters (attention and MLP projections)
    quantize: str | None = None  # QLoRA (the qlora extra, bitsandbytes): nf4 | fp4, the frozen base's attention and MLP projections held in 4 bits under the lora_r adapters; the KL reference is that 4-bit base
    data: str = ""  # JSONL of prompts with answers, records of the `task` kind of `illada eval`
    task: str = "gsm8k"  # gsm8k: {"question", "answer": "... #### N"} | exact: {"prompt", "answer"} (exact text)
    eval_data: str | None = None  # held-out JSONL of the same form: greedy accuracy every eval_every steps
    eval_limit: int = 100  # held-out records scored at each evaluation
    out_dir: str = "runs/illada-rl"  # run directory: checkpoints/, metrics.jsonl, rl.png
    rewards: dict[str, float] | None = None  # JSON {name or module:function: weight}; default: the task's correctness
    estimator: str = "coupled"  # sequence log-likelihood estimator: mean_field (d1) | coupled | elbo
    ratio: str = "sequence"  # policy ratio: sequence (length-normalised, GSPO) | token (per position, d1)
    prompt_mask_prob: float = 0.15  # mean_field: probability of masking each prompt token
    elbo_samples: int = 2  # elbo: Monte Carlo samples per estimate
    steps: int = 200  # RL steps (one rollout batch each)
    prompts_per_step: int = 8  # prompts per rollout batch
    group_size: int = 8  # rollouts per prompt (G)
    inner_updates: int = 2  # optimizer steps on each rollout batch
    clip: float = 0.2  # ratio clipping
    kl_coef: float = 0.0  # weight of the KL penalty to the reference (0: KL only measured)
    lr: float = 2e-5  # learning rate (constant after warmup)
    warmup_steps: int = 5  # linear warmup of the lr over the first RL steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # gradient norm clipping
    max_new_tokens: int = 96  # rollout budget
    block_length: int = 32  # rollout block length (variable length: blocks until EOS)
    sampling_steps: int = 32  # denoising steps per block of the rollouts
    temperature: float = 0.7  # rollout sampling temperature (> 0: a group must differ)
    threshold: float | None = None  # rollouts: parallel decoding by confidence threshold
    cache: str = "none"  # rollouts: approximate KV cache none | prefix | dual
    seed: int = 0  # seeds prompt order, rollouts and masks (exact resume)
    save_every: int = 25  # checkpoint every N steps
    keep_checkpoints: int = 2  # complete checkpoints kept
    eval_every: int = 25  # held-out evaluation every N steps (and at the start and end)
    log_every: int = 1  # metrics line every N steps
    device: str | None = None  # cpu | cuda | mps (default: best available)
    progress: bool = True  # progress bar on a terminal (plain lines elsewhere)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RLConfig":
        unknown = sorted((key for key in data if key not in cls.__dataclass_fields__), key=str)  # YAML: any key
        if unknown:
            raise IlladaError(f"rl config: unknown keys {', '.join(map(str, unknown))}")
        return cls(**data)

    def _check_types(self) -> None:
        """Each field has its annotated type (a YAML `threshold: high` is one clear error, not a TypeError in a
        comparison below); floats must be finite."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            want = None if kind.startswith("dict") else type_mismatch(value, kind)  # rewards: checked below
            if want:
                raise IlladaError(f"rl: {f.name} (--{f.name.replace('_', '-')}) must be {want}, got {value!r}")

    def validate(self) -> None:
        self._check_types()
        if not self.init_from:
            raise IlladaError("rl: --init-from (a checkpoint or run directory) is required")
        if not self.data:
            raise IlladaError("rl: --data (a JSONL of prompts with answers) is required")
        for name in ("steps", "prompts_per_step", "group_size", "inner_updates", "max_new_tokens", "block_length",
                     "sampling_steps", "save_every", "eval_every", "log_every", "eval_limit", "elbo_samples",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IlladaError(f"rl: {name} must be a positive integer, got {value!r}")
        check_lora(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets, where="rl")
        check_qlora(self.quantize, self.lora_r, where="rl")
        if self.group_size < 2:
            raise IlladaError("rl: group_size must be >= 2 (advantages are relative within a group)")
        for name in ("lr", "clip", "kl_coef", "weight_decay", "grad_clip", "temperature", "prompt_mask_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise IlladaError(f"rl: {name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.temperature <= 0:
            raise IlladaError("rl: lr and temperature must be > 0 (a group of greedy rollouts is identical)")
        if not 0 <= self.prompt_mask_prob < 1:
            raise IlladaError("rl: prompt_mask_prob must be in [0, 1)")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise IlladaError(f"rl: threshold must be in (0, 1), got {self.threshold}")
        if self.ratio not in ("sequence", "token"):
            raise IlladaError(f"rl: ratio must be sequence or token, got {self.ratio!r}")
        from illada.sampling.config import CACHES

        if self.cache not in CACHES:
            raise IlladaError(f"rl: cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.task not in ("gsm8k", "exact"):
            raise IlladaError(f"rl: task must be gsm8k or exact, got {self.task!r}")
        from illada.rl.estimators import ESTIMATORS

        if self.estimator not in ESTIMATORS:
            raise IlladaError(f"rl: unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.rewards is None:
            self.rewards = {"exact_answer" if self.task == "gsm8k" else "exact_match": 1.0}
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise IlladaError("rl: rewards must be a non-empty JSON object {name: weight}")
        for name, weight in self.rewards.items():
            if not isinstance(name, str) or not name:
                raise IlladaError(f"rl: reward names must be non-empty strings, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise IlladaError(f"rl: reward {name!r} needs a finite numeric weight, got {weight!r}")
