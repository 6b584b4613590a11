"""Phase 1, supervised instruction extraction: the teacher sees input + gold label and writes one general
instruction; each instruction keeps its example id.

A reply that cannot be used is retried once, strictly, then dropped with its reason (`Rejected`): unreadable,
cut at the token limit before its instruction line was complete, a copy of the prompt's worked example, leading to an answer the task does not have, or
to another of its answers than the example's own. The drops are counted in the run's report and result, and
so are the replies used though cut at the limit (a base model writes its instruction line, then rambles on)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from stillroom.backends.base import Backend, GenerationParams
from stillroom.pld.prompts import DROP_REASONS, extraction_messages, read_instruction
from stillroom.pld.teacher import ask_with_retry
from stillroom.tasks.task import Example, Task


@dataclass
class Instruction:
    """One extracted micro-instruction (text None when it was dropped; `dropped` says why)."""

    example_id: str
    label: str
    text: str | None
    raw: list[str]
    finish: list[str | None] = field(default_factory=list)
    """The backend's finish reason for each raw reply ('length': cut at the token limit)."""
    dropped: str | None = None
    """Why the last reply was not used: one of `DROP_REASONS`; None when `text` is the instruction."""

    @property
    def ok(self) -> bool:
        return self.text is not None


def extract_instructions(task: Task, examples: Sequence[Example], teacher: Backend, params: GenerationParams,
                         demo: bool = True, completes_cue: bool = False) -> list[Instruction]:
    """Phase 1 over `examples` (`demo`: open each prompt with the worked example; `completes_cue`: the teacher
    is a base model that completes the cue line, so a reply cut at the token limit after a complete first line
    is used, see `read_instruction`). Failures are recorded, never raised."""
    builders = [lambda strict, ex=ex: extraction_messages(task, ex, strict, demo) for ex in examples]
    labels = [str(x) for x in task.labels] if task.labels else []

    def parser(ex: Example):
        # A reply that repeats the input or the label is no instruction (unreadable); see `read_instruction`.
        return lambda text, truncated: read_instruction(text, truncated, keys=("instruction", "rule"),
                                                        forbid=(ex.input, str(ex.label)), labels=labels,
                                                        label=str(ex.label), quote=ex.input,
                                                        completes_cue=completes_cue)

    answers = ask_with_retry(teacher, builders, parse=[parser(ex) for ex in examples], params=params,
                             description="extract")
    return [Instruction(example_id=ex.id, label=str(ex.label), text=ans.value if isinstance(ans.value, str) else None,
                        raw=ans.raw, finish=ans.finish, dropped=ans.reason)
            for ex, ans in zip(examples, answers, strict=True)]


def drop_counts(instructions: Sequence[Instruction]) -> dict[str, int]:
    """How many extractions were dropped, by reason (every reason listed, zeros included)."""
    c = Counter(i.dropped for i in instructions if not i.ok)
    return {r: c.get(r, 0) for r in DROP_REASONS}


def kept_truncated(instructions: Sequence[Instruction]) -> int:
    """Extractions used although their reply was cut at the token limit (after a complete instruction line)."""
    return sum(i.ok and bool(i.finish) and i.finish[-1] == "length" for i in instructions)


def retried(instructions: Sequence[Instruction]) -> int:
    """Extractions that needed the strict retry."""
    return sum(len(i.raw) > 1 for i in instructions)
