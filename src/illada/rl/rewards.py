"""Rewards for RL on verifiable tasks: each maps (completion text, sample record) to a float.

Built in: `exact_answer` (GSM8K-style `#### N` compared as numbers with the record's answer, as `illada eval` does),
`exact_match` (the whole completion equals the record's answer, as the `exact` eval kind compares),
`format` (the completion ends with one `#### <number>` line), `unit_tests` (HumanEval-style records: the program
runs in the bubblewrap sandbox, never in this process) and any user function given as `module:function` taking
(completion, sample) and returning a number. A reward that raises or returns a non-number stops the run with an
error naming the sample, before anything is updated.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

from illada.errors import IlladaError


class Reward(Protocol):
    name: str

    def __call__(self, completion: str, sample: dict) -> float: ...


class RewardError(IlladaError):
    """A reward function failed on one sample."""


@dataclass(frozen=True)
class ExactAnswerReward:
    """1.0 when the `#### N` answer equals the sample's answer as a number, else 0.0."""

    name: str = "exact_answer"

    def __call__(self, completion: str, sample: dict) -> float:
        from illada.evaluation.answers import extract_answer, extract_gold, numbers_equal

        return float(numbers_equal(extract_answer(completion), extract_gold(sample["answer"])))


@dataclass(frozen=True)
class ExactMatchReward:
    """1.0 when the completion equals the sample's answer as text (surrounding space and a final period aside, the
    `exact` metric of `illada eval`), else 0.0."""

    name: str = "exact_match"

    def __call__(self, completion: str, sample: dict) -> float:
        from illada.evaluation.tasks import exact_normal

        return float(exact_normal(completion) == exact_normal(sample["answer"]))


_FINAL = re.compile(r"\n?####\s*[-\u2212]?[\d,]*\.?\d+\s*$")


@dataclass(frozen=True)
class FormatReward:
    """1.0 when the completion ends with exactly one `#### <number>` line, else 0.0."""

    name: str = "format"

    def __call__(self, completion: str, sample: dict) -> float:
        return float(completion.count("####") == 1 and _FINAL.search(completion.rstrip()) is not None)


@dataclass(frozen=True)
class UnitTestReward:
    """1.0 when a HumanEval-style record's tests pass on the completion (run in the sandbox), else 0.0."""

    timeout: float = 10.0
    allow_unsandboxed: bool = False
    chat: bool = False
    name: str = "unit_tests"

    def __call__(self, completion: str, sample: dict) -> float:
        from illada.evaluation.sandbox import run_python
        from illada.evaluation.tasks import humaneval_program

        program = humaneval_program(sample, completion, self.chat)
        return float(run_python(program, timeout=self.timeout, allow_unsandboxed=self.allow_unsandboxed).passed)


@dataclass(frozen=True)
class FunctionReward:
    """A user reward `module:function(completion, sample) -> number`."""

    function: Callable[[str, dict], float]
    name: str

    def __call__(self, completion: str, sample: dict) -> float:
        return self.function(completion, sample)


BUILTIN: dict[str, Callable[[], Reward]] = {"exact_answer": ExactAnswerReward, "exact_match": ExactMatchReward,
                                            "format": FormatReward, "unit_tests": UnitTestReward}


def get_reward(spec: str, **options) -> Reward:
    """A built-in reward by name, or `module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec](**options) if spec == "unit_tests" else BUILTIN[spec]()
    if ":" not in spec:
        raise IlladaError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN)} or module:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a user module that fails to import, for any reason
        raise IlladaError(f"reward {spec}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise IlladaError(f"reward {spec}: {module_name} has no function {attr!r}")
    return FunctionReward(function, spec)


@dataclass(frozen=True)
class WeightedRewards:
    """The weighted sum of several rewards; `score` also returns each part (for the metrics)."""

    parts: tuple[tuple[Reward, float], ...]

    def score(self, completions: list[str], samples: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        totals = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for reward, weight in self.parts:
            values = []
            for i, (completion, sample) in enumerate(zip(completions, samples)):
                try:
                    value = reward(completion, sample)
                    value = float(value)
                except Exception as error:  # a plug-in's failure, whatever it is, is reported with its sample
                    where = sample.get("question", sample.get("prompt", ""))
                    raise RewardError(f"reward {reward.name} failed on sample {i} ({str(where)[:60]!r}): "
                                      f"{type(error).__name__}: {error}") from None
                if not math.isfinite(value):
                    raise RewardError(f"reward {reward.name} returned {value} on sample {i}")
                values.append(value)
                totals[i] += weight * value
            parts[reward.name] = values
        return totals, parts


def build_rewards(specs: dict[str, float] | list[str], **options) -> WeightedRewards:
    """From {"exact_answer": 1.0, "format": 0.1} (or a list of names, weight 1 each)."""
    if isinstance(specs, (list, tuple)):
        specs = {s: 1.0 for s in specs}
    if not specs:
        raise IlladaError("rl: at least one reward is needed")
    return WeightedRewards(tuple((get_reward(name, **options), float(w)) for name, w in specs.items()))
