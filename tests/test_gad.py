"""GAD (Generative Adversarial Distillation) on tiny random Gemma-3 models built in-process (fast, CPU).

The Bradley-Terry loss against a direct computation and the direction of its gradient; the discriminator learns
to tell fixed teacher answers from student texts; the TRL reward function returns one score per completion and
prefers teacher-like text; `run_gad` end to end with a scripted teacher (G=2, a few steps): every student
parameter changes in each stage, metrics.json holds eval before/after and per-step reward and discriminator
statistics, and a rerun makes no teacher call and retrains nothing; the LoRA adversarial stage; the CLI.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")

from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

from stillroom.gad.discriminator import Discriminator, bt_loss  # noqa: E402

WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "plum", "van", "lime"]
LABELS = ["fruit", "colour", "vehicle"]
GOLD = {"red": "colour", "green": "colour", "blue": "colour", "lime": "colour", "apple": "fruit", "pear": "fruit",
        "plum": "fruit", "car": "vehicle", "bus": "vehicle", "van": "vehicle"}
CORPUS = [f"Classify the word.\n\nInput: {w} {i}\nAnswer: {lab}" for w in WORDS for i in range(4) for lab in LABELS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS, vocab_size=320)


def tiny_lm(tok, seed=0):
    return tiny_gemma(tok, seed=seed, init=0.2)


def fixed_pairs():
    prompts = [f"Input: {w} {i}\nAnswer:" for i, w in enumerate(WORDS)]
    teacher = [" " + GOLD[w] for w in WORDS]
    student = [" red red blue car van the" for _ in WORDS]  # long, off-task: what an untrained student writes
    return prompts, teacher, student


# ------------------------------------------------------------------------------------------------ loss


def test_bt_loss_matches_direct_computation_and_gradient_direction():
    g = torch.Generator().manual_seed(0)
    r_t = torch.randn(32, generator=g, dtype=torch.float64, requires_grad=True)
    r_s = torch.randn(32, generator=g, dtype=torch.float64, requires_grad=True)
    loss = bt_loss(r_t, r_s)
    direct = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(r_t.tolist(), r_s.tolist(), strict=True)) / 32
    assert loss.item() == pytest.approx(direct, rel=1e-9)
    loss.backward()
    # Gradient descent raises the teacher's score and lowers the student's, by σ(r_s − r_t)/n each.
    expected = torch.sigmoid(r_s - r_t).detach() / 32
    assert torch.all(r_t.grad < 0) and torch.all(r_s.grad > 0)
    assert torch.allclose(-r_t.grad, expected) and torch.allclose(r_s.grad, expected)
    assert bt_loss(torch.tensor([5.0]), torch.tensor([-5.0])) < bt_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------------------------ discriminator


@pytest.fixture(scope="module")
def trained_disc(tok):
    """A discriminator built from a tiny student and trained on fixed teacher vs student texts."""
    student = tiny_lm(tok, seed=1)
    disc = Discriminator.from_student(student, tok, learning_rate=3e-3, micro_batch=4)
    prompts, teacher, sampled = fixed_pairs()
    before = disc.accuracy(prompts, teacher, sampled)
    stats = [disc.step(prompts, teacher, sampled) for _ in range(25)]
    return {"student": student, "disc": disc, "before": before, "stats": stats}


def test_discriminator_copies_the_student_and_scores_at_the_last_token(tok, trained_disc):
    from transformers import AutoModelForSequenceClassification

    student = tiny_lm(tok, seed=1)
    disc = Discriminator.from_student(student, tok)
    assert disc.model.config.num_labels == 1 and disc.model.config.pad_token_id == tok.pad_token_id
    sd = student.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in disc.model.model.state_dict().items())
    # Padding does not change a score: it is read at the last non-pad token.
    p, t, _ = fixed_pairs()
    alone = disc.score(p[:1], t[:1])
    padded = disc.score(p[:2], [t[0], t[1] + " and a much longer answer"])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    assert isinstance(disc.model, AutoModelForSequenceClassification._model_mapping[type(disc.model.config)])


def test_discriminator_training_raises_accuracy(trained_disc):
    stats = trained_disc["stats"]
    prompts, teacher, sampled = fixed_pairs()
    after = trained_disc["disc"].accuracy(prompts, teacher, sampled)
    assert trained_disc["before"] < 1.0 and after == 1.0
    assert stats[-1]["loss"] < stats[0]["loss"] and stats[-1]["loss"] < 0.2
    assert stats[-1]["r_teacher"] > stats[-1]["r_student"]
    assert trained_disc["disc"].steps == 25


def test_reward_function_scores_each_completion_and_prefers_teacher_text(trained_disc):
    from stillroom.gad.train import GADReward

    disc = trained_disc["disc"]
    prompts, teacher, sampled = fixed_pairs()
    reward = GADReward(disc, update=False)
    # As TRL calls it: each prompt (and its dataset columns) repeated per completion, G = 2.
    ps = [p for p in prompts[:3] for _ in range(2)]
    completions = [c for t, s in zip(teacher[:3], sampled[:3], strict=True) for c in (t, s)]
    scores = reward(prompts=ps, completions=completions, completion_ids=None, teacher=[t for t in teacher[:3] for _ in range(2)])
    assert len(scores) == len(completions) and all(isinstance(s, float) for s in scores)
    assert all(scores[i] > scores[i + 1] for i in range(0, 6, 2))
    assert disc.steps == 25  # update=False: scoring only

    logged: dict[str, float] = {}
    updating = GADReward(disc, update=True)
    before = disc.steps
    out = updating(prompts=ps, completions=completions, teacher=[t for t in teacher[:3] for _ in range(2)],
                   log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out == pytest.approx(scores)  # the reward is read before the discriminator's update
    assert disc.steps == before + 1 and {"gad/disc_loss", "gad/disc_accuracy"} <= set(logged)


# ------------------------------------------------------------------------------------------------ route


@pytest.fixture(scope="module")
def dirs(tok, tmp_path_factory):
    from stillroom.backends.embedded import save_model_folder

    root = tmp_path_factory.mktemp("gad")
    save_model_folder(tiny_lm(tok, seed=3), tok, root / "student")
    (root / "task.jsonl").write_text("".join(
        json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}", "label": GOLD[WORDS[i % len(WORDS)]]}) + "\n"
        for i in range(30)))
    return root


def _teacher():
    from stillroom.backends.scripted import ScriptedBackend

    return ScriptedBackend(lambda prompt, params: GOLD[prompt[-1]["content"].split()[1]])


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_run_gad_end_to_end_changes_every_parameter_and_resumes_free(dirs, tmp_path):
    from stillroom.config import TaskConfig
    from stillroom.gad.config import GADConfig
    from stillroom.gad.train import run_gad

    cfg = GADConfig(task=TaskConfig(spec=str(dirs / "task.jsonl")), teacher={"spec": "scripted:gold"},
                    student=str(dirs / "student"), lora=False,
                    num_generations=2, prompts_per_step=2, adversarial_steps=2, temperature=1.0,
                    max_completion_length=6, disc_warmup_steps=2, warmup_steps=2, batch_size=4, train_limit=8,
                    eval_limit=4, learning_rate=1e-3, warmup_learning_rate=1e-3, disc_learning_rate=1e-3)
    be = _teacher()
    m = run_gad(cfg, tmp_path, teacher_backend=be)
    assert be.calls == m["data"]["examples"] == 8 and m["data"]["teacher_accuracy"] == 1.0

    base, warm, final = _weights(dirs / "student"), _weights(tmp_path / "warmup"), _weights(tmp_path / "student")
    assert set(base) == set(warm) == set(final)
    assert [k for k in base if torch.equal(base[k], warm[k])] == []  # the warm-up moved every parameter
    assert [k for k in base if torch.equal(warm[k], final[k])] == []  # ... and so did the adversarial stage

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["conditions"]) == {"student (no distillation)", "student (GAD)"}
    assert all(c["n"] == 4 for c in saved["conditions"].values())
    stages = [h["stage"] for h in saved["warmup"]["discriminator"]]
    assert stages == ["disc-only", "disc-only", "seqkd", "seqkd"] and saved["warmup"]["seqkd"]["steps"] == 2
    log = saved["adversarial"]["log"]
    assert saved["adversarial"]["steps"] == 2 and len(log) == 2
    assert all({"reward_mean", "reward_std", "disc_accuracy", "disc_loss", "kl"} <= set(x) for x in log)
    assert saved["adversarial"]["discriminator_updates"] == 2
    assert (tmp_path / "discriminator" / "config.json").exists() and (tmp_path / "config.yaml").exists()
    assert (tmp_path / "cache.sqlite").exists() and (tmp_path / "report.html").exists()

    be2 = _teacher()
    m2 = run_gad(cfg, tmp_path, teacher_backend=be2)
    assert be2.calls == 0 and m2["data"]["teacher_calls_cached"] == 8
    assert sum("resumed" in n for n in m2["notes"]) == 2
    assert torch.equal(_weights(tmp_path / "student")[next(iter(final))], final[next(iter(final))])


def test_lora_warm_up_and_adversarial_stage_change_only_adapted_modules(tok, tmp_path):
    from stillroom.config import TaskConfig
    from stillroom.gad.config import GADConfig
    from stillroom.gad.train import adversarial, warm_up

    student = tiny_lm(tok, seed=4)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    lora_keys = {k for k in start if k.endswith(("q_proj.weight", "v_proj.weight"))}
    disc = Discriminator.from_student(student, tok, learning_rate=1e-3)
    prompts, teacher, _ = fixed_pairs()
    records = [{"prompt": p, "completion": t} for p, t in zip(prompts, teacher, strict=True)]
    cfg = GADConfig(task=TaskConfig(spec="unused.jsonl"), student="unused", lora=True, lora_r=2,
                    num_generations=2, prompts_per_step=2, adversarial_steps=1, temperature=1.0,
                    max_completion_length=5, disc_warmup_steps=1, warmup_steps=2, batch_size=4,
                    warmup_learning_rate=1e-2, learning_rate=1e-2, beta=0.0)
    warm = warm_up(student, tok, records, disc, cfg, tmp_path / "warm")
    # The discriminator sampled the PEFT-wrapped student after each SFT step (1 + 2 steps).
    assert [h["stage"] for h in warm.info["discriminator"]] == ["disc-only", "seqkd", "seqkd"] and disc.steps == 3
    mid = warm.model.state_dict()
    assert set(mid) == set(start)  # LoRA merged: a plain model again
    assert {k for k in start if not torch.equal(start[k], mid[k])} == lora_keys
    mid = {k: v.clone() for k, v in mid.items()}
    res = adversarial(warm.model, tok, records, disc, cfg, tmp_path / "adv")
    after = res.model.state_dict()
    assert set(after) == set(start)
    assert {k for k in start if not torch.equal(mid[k], after[k])} == lora_keys
    assert res.info["steps"] == 1 and disc.steps == 4


def test_cli_help_and_config_errors(dirs, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    res = CliRunner().invoke(app, ["gad", "--help"])
    assert res.exit_code == 0 and "Generative Adversarial Distillation" in res.output and "--num-generations" in res.output
    cfg = tmp_path / "gad.yaml"
    cfg.write_text(f"task: {{spec: {dirs / 'task.jsonl'}}}\nstudent: {dirs / 'student'}\nnum_generations: 1\n")
    bad = CliRunner().invoke(app, ["gad", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert bad.exit_code == 2 and "num_generations" in bad.output
    missing = CliRunner().invoke(app, ["gad", "--task", str(dirs / "task.jsonl")])
    assert missing.exit_code != 0 and "--student" in missing.output
