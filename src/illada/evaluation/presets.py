"""Per-task evaluation settings, reproducing the iLLaDA paper's protocols (reference §6.3).

Base models: ARC-C / HellaSwag / PIQA by confidence scoring, 0-shot; MMLU / CMMLU by single-token likelihood,
5-shot, on BOS + context + [MASK] + EOS as the published iLLaDA eval code (mc_num 1, BOS prepended, EOS appended;
`add_bos=False, append_eos=False` gives the plain context + [MASK]); GSM8K 8-shot by variable-length generation (gen 1024, block 32, 32 steps per block); HumanEval by one fixed
512-token block. Instruct models (`<task>-instruct`): everything by generation with the chat template, greedy;
MMLU 5-shot as a multi-turn chat with 3 new tokens; math/code 0-shot with a reasoning prompt, gen 2048, block 32,
end-think boost 100 with power 3 (power 1 for HumanEval).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from illada.errors import IlladaError
from illada.sampling.config import SamplingConfig

KINDS = ("multiple_choice", "mmlu", "gsm8k", "humaneval", "exact")
METHODS = ("confidence", "mc", "exact", "generate")


@dataclass
class TaskPreset:
    """How one task is prompted and scored. `kind` picks the data format and metric; `method` is a scoring
    method (confidence | mc | exact) for choice tasks, or "generate"."""

    name: str
    kind: str
    method: str
    num_fewshot: int = 0
    chat: bool = False
    # choice tasks: the context and each option are rendered from these (fields of the JSONL record + {choice})
    context_template: str = "{question}"
    choice_template: str = " {choice}"
    mc_num: int = 128
    # the scored input of the likelihood methods (exact, mc): None = the method's default (no BOS, no EOS)
    add_bos: bool | None = None
    append_eos: bool | None = None
    # generation tasks: the sampler (the paper's protocols: one token per pass, greedy, no CFG)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=1024))
    description: str = ""
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "TaskPreset":
        """A copy with `changes` (None: keep); sampler knobs (SamplingConfig fields) go into `sampling`."""
        changes = {k: v for k, v in changes.items() if v is not None}
        knobs = {k: changes.pop(k) for k in list(changes) if k in SamplingConfig.option_names()}
        if knobs:
            changes["sampling"] = self.sampling.replace(**knobs)
        preset = dataclasses.replace(self, **changes)
        preset.validate()
        return preset

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise IlladaError(f"task kind {self.kind!r} unknown; choose from {', '.join(KINDS)}")
        if self.method not in METHODS:
            raise IlladaError(f"method {self.method!r} unknown; choose from {', '.join(METHODS)}")
        generative = self.kind in ("gsm8k", "humaneval", "exact")
        if generative and self.method != "generate":
            raise IlladaError(f"task {self.name}: {self.kind} is scored by generation (method 'generate')")
        if self.kind == "multiple_choice" and self.method == "generate":
            raise IlladaError(f"task {self.name}: free-form choices are scored, not generated; use the mmlu kind "
                              "for letter answers")
        if self.num_fewshot < 0 or self.mc_num < 1:
            raise IlladaError(f"task {self.name}: num_fewshot >= 0, mc_num >= 1")


_BASE = [
    TaskPreset("multiple_choice", "multiple_choice", "confidence",
               description="generic choice JSONL (question, choices, answer), confidence scoring, 0-shot"),
    TaskPreset("arc_challenge", "multiple_choice", "confidence", context_template="Question: {question}\nAnswer:",
               description="ARC-Challenge protocol: confidence, 0-shot"),
    TaskPreset("hellaswag", "multiple_choice", "confidence", description="HellaSwag protocol: confidence, 0-shot"),
    TaskPreset("piqa", "multiple_choice", "confidence", context_template="Question: {question}\nAnswer:",
               description="PIQA protocol: confidence, 0-shot"),
    TaskPreset("mmlu", "mmlu", "exact", num_fewshot=5, add_bos=True, append_eos=True,
               description="MMLU protocol: letter answers by single-token likelihood (mc_num 1), 5-shot, on "
                           "BOS + context + [MASK] + EOS as the published iLLaDA eval (--no-add-bos "
                           "--no-append-eos: context + [MASK])"),
    TaskPreset("cmmlu", "mmlu", "exact", num_fewshot=5, add_bos=True, append_eos=True,
               description="CMMLU protocol (as MMLU: single-token likelihood on BOS + context + [MASK] + EOS)"),
    TaskPreset("gsm8k", "gsm8k", "generate", num_fewshot=8,
               sampling=SamplingConfig(max_new_tokens=1024, block_length=32, steps=32, stop_strings=("Question:",)),
               description="GSM8K: 8-shot, variable-length generation, gen 1024 / block 32"),
    TaskPreset("exact", "exact", "generate", sampling=SamplingConfig(max_new_tokens=64, block_length=32, steps=32),
               description="exact match of the generated text with `answer` (`prompt` [+ `suffix`: the gap between "
                           "them is filled, as many tokens as the answer]); variable length, block 32"),
    TaskPreset("humaneval", "humaneval", "generate",
               sampling=SamplingConfig(max_new_tokens=512, block_length=512, steps=512, variable_length=False,
                                       stop_strings=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")),
               description="HumanEval: one fixed 512-token block, tests in a sandbox, pass@1"),
]
_INSTRUCT = [
    TaskPreset("mmlu-instruct", "mmlu", "generate", num_fewshot=5, chat=True,
               sampling=SamplingConfig(max_new_tokens=3, block_length=3, steps=3), description="MMLU, instruct: 5-shot multi-turn chat, 3 generated tokens"),
    TaskPreset("gsm8k-instruct", "gsm8k", "generate", chat=True,
               sampling=SamplingConfig(max_new_tokens=2048, block_length=32, steps=32, end_think_boost=100.0,
                                       end_think_power=3.0),
               description="GSM8K, instruct: 0-shot reasoning prompt, gen 2048 / block 32, end-think boost"),
    TaskPreset("humaneval-instruct", "humaneval", "generate", chat=True,
               sampling=SamplingConfig(max_new_tokens=2048, block_length=32, steps=32, end_think_boost=100.0,
                                       end_think_power=1.0),
               description="HumanEval, instruct: 0-shot, gen 2048 / block 32, end-think boost power 1"),
]
PRESETS: dict[str, TaskPreset] = {p.name: p for p in _BASE + _INSTRUCT}


def get_preset(name: str, instruct: bool = False) -> TaskPreset:
    """The preset `name` (its `-instruct` variant when `instruct`)."""
    key = f"{name}-instruct" if instruct and not name.endswith("-instruct") else name
    if key not in PRESETS:
        if instruct and name in PRESETS:
            raise IlladaError(f"task {name} has no instruct preset; instruct presets: "
                              f"{', '.join(k for k in PRESETS if k.endswith('-instruct'))}")
        raise IlladaError(f"unknown task {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]
