"""Reversal facts: a fixed world of (child, parent) pairs with made-up names of fixed length. Training text holds
"X's parent is Y." for every pair, and also the reverse "Y's child is X." for the pairs of the train split;
the pairs of the test split are seen only forwards. The test asks the reverse relation (LLaDA's reversal-curse
result): by the question "Y's child is" (any model) or by filling the masked name in "[X]'s parent is Y."
(a bidirectional model only). The forward probe checks that the facts were learned at all.

Names are a 5-letter first name and a 6-letter surname from fixed lists (so a name is always 12 tokens for a
byte-level tokenizer, and a fact is about 11 bits to memorise: which of 40 x 40 names is the parent).
"""
from __future__ import annotations

import random
from functools import cached_property

from illada.tasks.base import Example, Task

FIRST = ("Alice", "Bruno", "Clara", "David", "Elena", "Felix", "Grace", "Henry", "Irene", "James", "Karen", "Louis",
         "Maria", "Nadia", "Oscar", "Paula", "Quinn", "Rosie", "Simon", "Tessa", "Ulric", "Viola", "Wanda", "Xenia",
         "Yusuf", "Zelda", "Aaron", "Bella", "Caleb", "Daisy", "Ethan", "Fiona", "Gavin", "Hazel", "Isaac", "Julia",
         "Kevin", "Laura", "Mason", "Olive")
LAST = ("Bailey", "Barker", "Bishop", "Brooks", "Carter", "Cooper", "Dalton", "Dawson", "Fisher", "Fowler", "Garcia",
        "Gibson", "Graham", "Hanson", "Harper", "Hudson", "Hunter", "Jensen", "Keller", "Lawson", "Mercer", "Miller",
        "Monroe", "Morgan", "Murphy", "Nelson", "Norris", "Parker", "Porter", "Reeves", "Rhodes", "Sawyer", "Snyder",
        "Spence", "Tucker", "Turner", "Walker", "Warren", "Weaver", "Wilson")
PROBES = ("reverse", "forward", "infill")


def make_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


class Reversal(Task):
    name = "reversal"
    eval_kind = "exact"
    pairs_in_world = 200
    test_fraction = 0.25
    world_seed = 0
    variants = PROBES  # what the eval records ask: reverse (question), forward (question) or infill (suffix)

    @cached_property
    def world(self) -> list[tuple[str, str]]:
        """(child, parent) pairs, all names distinct; the same for every split and seed."""
        rng, seen, pairs = random.Random(f"{self.name}-world:{self.world_seed}"), set(), []
        while len(pairs) < self.pairs_in_world:
            child, parent = make_name(rng), make_name(rng)
            if child != parent and not {child, parent} & seen:
                seen |= {child, parent}
                pairs.append((child, parent))
        return pairs

    def _pair_split(self, child: str) -> str:
        return self.split_of(Example(key=child, prompt="", response=""))

    def _forward(self, child: str, parent: str) -> Example:
        return Example(key=child, prompt=f"{child}'s parent is", response=f" {parent}.",
                       record={"prompt": f"{child}'s parent is", "answer": parent})

    def _reverse(self, child: str, parent: str) -> Example:
        if self.variant == "infill":
            record = {"prompt": "", "suffix": f"'s parent is {parent}.", "answer": child}
        else:
            record = {"prompt": f"{parent}'s child is", "answer": child}
        return Example(key=child, prompt=f"{parent}'s child is", response=f" {child}.", record=record)

    def examples(self, split: str, seed: int):
        rng = random.Random(f"{self.name}:{split}:{seed}")
        while True:
            child, parent = rng.choice(self.world)
            pair_split = self._pair_split(child)
            if split == "train":  # every forward fact; reverse facts of train pairs only
                if rng.random() < 0.5 or pair_split == "test":
                    yield self._forward(child, parent)
                else:
                    yield self._reverse(child, parent)
            elif pair_split == "test":  # probes of the pairs seen only forwards
                if self.variant == "forward":
                    yield self._forward(child, parent)
                else:
                    yield self._reverse(child, parent)
