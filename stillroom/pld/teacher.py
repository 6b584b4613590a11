"""Asking the teacher: batched calls through the cached backend, one retry on a reply that cannot be used."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stillroom.backends.base import Backend, GenerationParams, Message
from stillroom.ui import progress_bar


@dataclass
class Answer:
    """A parsed teacher reply (None when no reply could be used, even after the retry), every raw reply behind it
    with the backend's finish reason ('stop', 'length': cut at the token limit), and why the last reply was
    rejected (a `Rejected` reason, or 'unreadable')."""

    value: object | None
    raw: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


Parser = Callable[[str, bool], object | None]
"""(reply text, truncated) -> the parsed value, None (unreadable) or a `Rejected` (read, but not usable)."""


def ask_with_retry(
    teacher: Backend,
    builders: Sequence[Callable[[bool], list[Message]]],
    parse: Parser | Sequence[Parser],
    params: GenerationParams,
    description: str = "teacher",
    chunk_size: int = 16,
) -> list[Answer]:
    """For each builder (strict flag -> messages): ask, parse, and ask once more strictly if the reply cannot
    be used (unreadable, or rejected by the parser: cut off, copied, a wrong answer named).

    `parse` is one parser for all replies, or one per builder (to reject replies that echo that item's input);
    it gets the reply's text and whether the backend cut it at the token limit (finish reason 'length').

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
            retry = [i for i, g in zip(idx, gens, strict=True) if not _take(answers[i], parsers[i], g)]
            if retry:
                for i, g in zip(retry, teacher.generate_many([builders[i](True) for i in retry], params), strict=True):
                    _take(answers[i], parsers[i], g)
            bar.advance(job, len(idx))
    return answers


def _take(answer: Answer, parser: Parser, g) -> bool:
    """Record reply `g` in `answer`; True when it could be used."""
    from stillroom.pld.prompts import Rejected

    answer.raw.append(g.text)
    answer.finish.append(g.finish_reason)
    got = parser(g.text, g.finish_reason == "length")
    if got is None or isinstance(got, Rejected):
        answer.value, answer.reason = None, got.reason if isinstance(got, Rejected) else "unreadable"
        return False
    answer.value, answer.reason = got, None
    return True
