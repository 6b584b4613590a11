"""The one place prompts are built from a task, so every route and every benchmark sees the same text."""

from __future__ import annotations

from collections.abc import Sequence

from stillroom.backends.base import Message, chat_to_text  # noqa: F401  (lives with the backends that use it)
from stillroom.tasks.task import Example, Task


def render_input(task: Task, ex: Example) -> str:
    """An example's input with its prefix, listing the options when they vary per example."""
    text = f"{task.input_prefix}{ex.input}"
    if ex.choices:
        text += "\nOptions: " + "; ".join(ex.choices)
    return text


def continuation(option: str) -> str:
    """The scored continuation for an option: a leading space after the answer prefix."""
    return " " + option


def render_prompt(
    task: Task, ex: Example, shots: Sequence[Example] = (), system_prompt: str | None = None
) -> str:
    """Completion-style prompt ending right before the answer (used for log-likelihood scoring).

    Layout: system prompt (e.g. a PLD rulebook), task instruction, k solved shots, then the example.
    """
    parts: list[str] = []
    if system_prompt and system_prompt.strip():
        parts.append(system_prompt.strip() + "\n\n")
    if task.instruction.strip():
        parts.append(task.instruction.strip() + "\n\n")
    for s in shots:
        parts.append(render_input(task, s) + task.answer_prefix + continuation(str(s.label)) + "\n\n")
    parts.append(render_input(task, ex) + task.answer_prefix)
    return "".join(parts)


def render_chat(
    task: Task, ex: Example, shots: Sequence[Example] = (), system_prompt: str | None = None, reason: bool = False
) -> list[Message]:
    """Chat messages for backends that answer by generation.

    The system message carries the system prompt and the instruction; shots become user/assistant turns.
    With `reason=True` the student is asked to think first and end with `Answer: <label>`.
    """
    system = []
    if system_prompt and system_prompt.strip():
        system.append(system_prompt.strip())
    if task.instruction.strip():
        system.append(task.instruction.strip())
    if task.kind != "free_text" and not ex.choices and task.labels:
        system.append("Answer with exactly one of: " + ", ".join(task.labels) + ".")
    elif ex.choices:
        system.append("Answer with exactly one of the listed options.")
    if reason:
        system.append("Think step by step, then give the final answer on its own last line as 'Answer: <answer>'.")
    else:
        system.append("Reply with the answer only.")
    messages: list[Message] = [{"role": "system", "content": "\n\n".join(system)}]
    for s in shots:
        messages.append({"role": "user", "content": render_input(task, s)})
        messages.append({"role": "assistant", "content": str(s.label)})
    messages.append({"role": "user", "content": render_input(task, ex)})
    return messages
