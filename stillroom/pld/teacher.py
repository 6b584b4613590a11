"""Asking the teacher: batched calls through the cached backend, one retry on an unreadable reply."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stillroom.backends.base import Backend, GenerationParams, Message
from stillroom.ui import progress_bar


@dataclass
class Answer:
    """A parsed teacher reply (None when unreadable after the retry) and every raw reply behind it."""

    value: object | None
    raw: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.value is not None


def ask_with_retry(
    teacher: Backend,
    builders: Sequence[Callable[[bool], list[Message]]],
    parse: Callable[[str], object | None] | Sequence[Callable[[str], object | None]],
    params: GenerationParams,
    description: str = "teacher",
    chunk_size: int = 16,
) -> list[Answer]:
    """For each builder (strict flag -> messages): ask, parse, and ask once more strictly if unreadable.

    `parse` is one parser for all replies, or one per builder (to reject replies that echo that item's input).

    Calls go out in chunks through `generate_many`, so the cache commits each reply as it arrives and a
    resumed run replays them all for free.
    """
    answers = [Answer(None) for _ in builders]
    parsers = list(parse) if isinstance(parse, Sequence) else [parse] * len(builders)
    if len(parsers) != len(builders):
        raise ValueError(f"{len(parsers)} parsers for {len(builders)} prompts")
    with progress_bar() as bar:
        job = bar.add_task(description, total=len(builders))
        for start in range(0, len(builders), chunk_size):
            idx = list(range(start, min(start + chunk_size, len(builders))))
            gens = teacher.generate_many([builders[i](False) for i in idx], params)
            retry = []
            for i, g in zip(idx, gens, strict=True):
                answers[i].raw.append(g.text)
                answers[i].value = parsers[i](g.text)
                if answers[i].value is None:
                    retry.append(i)
            if retry:
                for i, g in zip(retry, teacher.generate_many([builders[i](True) for i in retry], params), strict=True):
                    answers[i].raw.append(g.text)
                    answers[i].value = parsers[i](g.text)
            bar.advance(job, len(idx))
    return answers
