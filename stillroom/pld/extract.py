"""Phase 1, supervised instruction extraction: the teacher sees input + gold label and writes one general
instruction; each instruction keeps its example id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stillroom.backends.base import Backend, GenerationParams
from stillroom.pld.prompts import contradicts_label, extraction_messages, parse_single
from stillroom.pld.teacher import ask_with_retry
from stillroom.tasks.task import Example, Task


@dataclass
class Instruction:
    """One extracted micro-instruction (text None when the teacher's reply was unreadable twice)."""

    example_id: str
    label: str
    text: str | None
    raw: list[str]

    @property
    def ok(self) -> bool:
        return self.text is not None


def extract_instructions(task: Task, examples: Sequence[Example], teacher: Backend, params: GenerationParams) -> list[Instruction]:
    """Phase 1 over `examples`. Failures are recorded, never raised."""
    builders = [lambda strict, ex=ex: extraction_messages(task, ex, strict) for ex in examples]
    # A reply that repeats the input (or the label), or that leads to another answer than the example's own,
    # is no instruction for it: the parser rejects it, so it is retried, then recorded as failed.
    labels = [str(x) for x in task.labels] if task.labels else []

    def parser(ex: Example):
        def parse(text: str) -> str | None:
            got = parse_single(text, ("instruction", "rule"), forbid=(ex.input, str(ex.label)))
            return None if got is not None and contradicts_label(got, str(ex.label), labels) else got

        return parse

    parsers = [parser(ex) for ex in examples]
    answers = ask_with_retry(teacher, builders, parse=parsers, params=params, description="extract")
    return [Instruction(example_id=ex.id, label=str(ex.label), text=ans.value if isinstance(ans.value, str) else None,
                        raw=ans.raw) for ex, ans in zip(examples, answers, strict=True)]
