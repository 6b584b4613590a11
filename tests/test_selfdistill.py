"""Self-data distillation's rewrite prompt with worked demonstrations, the answer-line format, conditional
selection on it, and the healing completion a kept rewrite becomes (scripted teachers, no model)."""

from __future__ import annotations

import pytest

from stillroom.backends.base import GenerationParams, prompt_text
from stillroom.backends.scripted import ScriptedBackend
from stillroom.prune.selfdistill import (
    DEMONSTRATIONS,
    REWRITE_HEADER,
    REWRITE_TEMPLATE,
    acceptance_summary,
    end_at_answer_line,
    healing_completion,
    rewrite_prompt,
    select_rewrite,
    self_distill,
    sft_records,
)
from stillroom.tasks.prompts import render_input, render_prompt
from stillroom.tasks.task import Example, Task

LABELS = ("get_weather", "play_music", "book_restaurant")
UTTERANCES = {
    "get_weather": "Will it rain in Oslo tomorrow?",
    "play_music": "Put on some jazz by Miles Davis.",
    "book_restaurant": "Reserve a table for four at a sushi place tonight.",
}


def _task() -> Task:
    exs = [Example(id=f"u{i}", input=UTTERANCES[lab], label=lab) for i, lab in enumerate(LABELS)]
    return Task(name="intent", instruction="Predict the intent of the utterance. The possible choices for the "
                "intents are: get_weather, play_music, and book_restaurant.", kind="classification", labels=LABELS,
                examples=exs, input_prefix="Utterance: ", answer_prefix="\nIntent:")


def _reference(prompt) -> str:
    """The example's reference answer: the last reference section (the demonstrations' come first)."""
    return prompt_text(prompt).rsplit("### Reference Answer:\n", 1)[1].split("\n")[0]


def _demo_style(prompt, params: GenerationParams) -> str:
    ref = _reference(prompt)
    return f"The speaker asks for something that fits this request.\nAnswer: {ref}"


def test_demonstrations_are_in_the_rewrite_prompt_before_the_example():
    task = _task()
    ex = task.examples[0]
    p = rewrite_prompt(task, ex, demonstrations=DEMONSTRATIONS)
    assert p.startswith(REWRITE_HEADER) and p.count(REWRITE_HEADER) == 1
    assert len(DEMONSTRATIONS) >= 2
    for d in DEMONSTRATIONS:
        # Each demonstration is a solved section whose response ends with the explicit answer line.
        assert (f"### Instruction:\n{d.instruction}\n\n### Reference Answer:\n{d.reference}\n\n"
                f"### Response:\n{d.response}\n\n") in p
        assert d.response.splitlines()[-1] == f"Answer: {d.reference}"
        assert d.reference not in LABELS
        assert select_rewrite(task, ex, d.response).reason != "meta_phrase"  # demonstrations model clean answers
    assert p.index(DEMONSTRATIONS[-1].response) < p.index(UTTERANCES["get_weather"])
    assert p.endswith("### Reference Answer:\nget_weather\n\n### Response:\n")
    # Without demonstrations the prompt is the method's template exactly.
    instruction = task.instruction + "\n\n" + render_input(task, ex)
    assert rewrite_prompt(task, ex) == REWRITE_TEMPLATE.format(instruction=instruction, reference="get_weather",
                                                               seed="")


def test_teacher_answering_in_the_demonstrated_format_is_accepted():
    task = _task()
    seen = []

    def teacher(prompt, params):
        seen.append(prompt_text(prompt))
        return _demo_style(prompt, params)

    rows = self_distill(task, task.examples, ScriptedBackend(teacher, name="t"), max_new_tokens=32)
    assert all(DEMONSTRATIONS[0].response in p for p in seen)  # demonstrations are on by default
    assert [r["kept"] for r in rows] == [True] * 3 and {r["reason"] for r in rows} == {"kept"}
    s = acceptance_summary(rows)
    assert s["acceptance"] == 1.0 and s["reasons"] == {"kept": 3}
    for ex, r, rec in zip(task.examples, rows, sft_records(rows, "selected"), strict=True):
        assert r["extracted"] == ex.label
        assert r["rewrite"] == f" The speaker asks for something that fits this request.\nAnswer: {ex.label}"
        # Healing completion: the label first (what log-likelihood scoring reads after the answer prefix),
        # then the rewrite's own words.
        assert r["selected"] == f" {ex.label}\nThe speaker asks for something that fits this request."
        assert rec["prompt"] == render_prompt(task, ex) and rec["prompt"].endswith("\nIntent:")
        assert rec["completion"] == r["selected"]
    assert [x["completion"] for x in sft_records(rows, "original")] == [" " + lab for lab in LABELS]
    # As generated, ending with the answer line, when asked for.
    rows2 = self_distill(task, task.examples, ScriptedBackend(_demo_style, name="t"), completion="rewrite")
    assert [r["selected"] for r in rows2] == [r["rewrite"] for r in rows]
    with pytest.raises(ValueError):
        self_distill(task, task.examples, ScriptedBackend(_demo_style, name="t"), completion="label_last")


def test_other_label_meta_phrase_and_copied_demonstration_are_rejected_with_the_reason():
    task = _task()

    def teacher(prompt, params):
        ref = _reference(prompt)
        if ref == "get_weather":  # names another label on the answer line
            return "The speaker wants to hear a song.\nAnswer: play_music"
        if ref == "play_music":
            return f"As the reference answer says, this is about music.\nAnswer: {ref}"
        return DEMONSTRATIONS[1].response.rsplit("Answer:", 1)[0] + f"Answer: {ref}"

    rows = self_distill(task, task.examples, ScriptedBackend(teacher, name="t"))
    assert [r["reason"] for r in rows] == ["wrong_answer: play_music", "meta_phrase: reference answer",
                                           "copied_demonstration"]
    assert not any(r["kept"] for r in rows)
    assert [r["selected"] for r in rows] == [r["original"] for r in rows] == [" " + lab for lab in LABELS]
    assert acceptance_summary(rows)["reasons"] == {"wrong_answer": 1, "meta_phrase": 1, "copied_demonstration": 1}


def test_selection_reads_the_first_answer_line_and_ignores_a_made_up_continuation():
    task = _task()
    ex = task.examples[0]
    raw = ("Rain in Oslo is a forecast question.\nAnswer: get_weather\n\nUtterance: play a song\n"
           "Answer: play_music")
    assert end_at_answer_line(raw) == "Rain in Oslo is a forecast question.\nAnswer: get_weather"
    rows = self_distill(task, [ex], ScriptedBackend(lambda p, g: raw, name="t"))
    assert rows[0]["kept"] and rows[0]["raw"] == raw and rows[0]["selected"].startswith(" get_weather\n")
    # Tolerant parsing of the answer line (the evaluator's parse_choice), and a prose answer naming only the label.
    assert select_rewrite(task, ex, "Forecast question.\nAnswer: Get Weather.").keep
    assert select_rewrite(task, ex, "This asks for the forecast: get_weather").keep
    assert select_rewrite(task, ex, "Forecast question.\nAnswer:").reason == "no_answer"
    assert select_rewrite(task, ex, "Answer: play_music or get_weather").reason == "no_answer"


def test_healing_completion_styles():
    task = _task()
    ex = task.examples[0]
    text = "Rain is weather.\nAnswer: get_weather"
    assert healing_completion(task, ex, text) == " get_weather\nRain is weather."
    assert healing_completion(task, ex, "Answer: get_weather") == " get_weather"
    assert healing_completion(task, ex, text, "rewrite") == " " + text
    ft = Task(name="math", instruction="Add.", kind="free_text", answer_pattern=r"answer\s*:\s*(\S+)",
              examples=[Example(id="m0", input="2+2", label="4")])
    # Free text is scored by generating and extracting the answer: the rewrite stays as generated.
    assert healing_completion(ft, ft.examples[0], "Two and two make four.\nAnswer: 4") == \
        " Two and two make four.\nAnswer: 4"
