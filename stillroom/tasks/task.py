"""Task definition shared by every route: examples with stable ids, a label space, deterministic splits."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Literal

from stillroom.errors import TaskDataError

TaskKind = Literal["classification", "multiple_choice", "free_text"]


@dataclass(frozen=True)
class Example:
    """One labelled example.

    `choices` is set for multiple-choice examples whose options differ per example (BIG-bench style); for
    classification the options are the task's `labels`. `label` is the gold answer text (one of the choices
    or labels); None only for unlabelled free-text inputs.
    """

    id: str
    input: str
    label: str | None
    choices: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    """A task: what to do, the label space, and the examples."""

    name: str
    instruction: str
    kind: TaskKind
    examples: list[Example]
    labels: tuple[str, ...] | None = None
    """The label set for classification tasks (in a stable order)."""
    answer_pattern: str | None = None
    """For free text: a regex whose first group extracts the final answer from a generation."""
    source: str = ""
    """Where the examples came from (file path or `bigbench:<task>`)."""
    input_prefix: str = "Input: "
    """Written before each example's input in prompts."""
    answer_prefix: str = "\nAnswer:"
    """Written after each input; the answer (with a leading space) follows it."""
    locations: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)
    """Example id -> (unit, number): where in `source` it was read ('line' 7, 'row' 3, 'example' 12)."""

    def options(self, ex: Example) -> tuple[str, ...]:
        """The answer options for one example: its own choices, else the task's labels."""
        if ex.choices:
            return ex.choices
        if self.labels:
            return self.labels
        raise ValueError(f"task {self.name!r} is free text: example {ex.id!r} has no answer options")

    def extract_answer(self, text: str) -> str:
        """Final answer from free text (first group of `answer_pattern`, else the stripped first line)."""
        if self.answer_pattern:
            m = re.search(self.answer_pattern, text, flags=re.IGNORECASE | re.DOTALL)
            if m:
                return (m.group(1) if m.groups() else m.group(0)).strip()
        stripped = text.strip()
        return stripped.splitlines()[0].strip() if stripped else ""

    def splits(self, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.3) -> Splits:
        """Deterministic train/val/test split from a seed.

        Each example's position comes from a hash of (seed, id), so adding examples to a file never moves
        existing ones between splits, and the same seed always gives the same splits.
        """
        if not self.examples:
            raise TaskDataError(f"task {self.name!r} has no examples", path=self.source or None)
        order = sorted(
            self.examples,
            key=lambda e: hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest(),
        )
        n = len(order)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        for split_name, part, frac in (("train", train, 1 - val_fraction - test_fraction), ("val", val, val_fraction), ("test", test, test_fraction)):
            if frac > 0 and not part:
                raise TaskDataError(
                    f"split '{split_name}' is empty ({n} examples, fractions val={val_fraction} test={test_fraction}); "
                    "add examples or change the fractions",
                    path=self.source or None,
                )
        return Splits(train=train, val=val, test=test)


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def get(self, name: str) -> list[Example]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: expected train, val or test")
        return getattr(self, name)


def sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A deterministic sample of at most n examples (all of them when n is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    return rng.sample(list(examples), n)
