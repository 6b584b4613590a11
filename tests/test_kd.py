"""Knowledge distillation on tiny random models built in-process (fast, CPU).

Losses against direct computations (and TRL's generalized_jsd_loss); the top-k teacher cache (round trip,
rest mass, interrupt + resume with no shard recomputed, reopen without the teacher); training with each
divergence brings the student closer to the teacher and changes every trainable parameter; the trainer's loss
equals the formula (CE mix, T² scaling); vocabulary checks; hints; online and on-policy modes; `kd data` with a
scripted teacher (resume repays nothing) and `kd logits` end to end through the CLI.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("peft")

import torch.nn.functional as F  # noqa: E402
from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

from stillroom.errors import ConfigError  # noqa: E402
from stillroom.kd.hints import hint_loss, parse_layer_map, uniform_layer_map  # noqa: E402
from stillroom.kd.logit_cache import (  # noqa: E402
    answer_forward,
    build_logit_cache,
    check_vocab,
    encode_examples,
    left_pad,
)
from stillroom.kd.losses import (  # noqa: E402
    DIVERGENCES,
    dense_divergence,
    sparse_divergence,
    student_bucket_logprobs,
    topk_targets,
)
from stillroom.kd.trainer import KDConfig, KDTrainer, train_kd, training_arguments  # noqa: E402

WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "the", "a", "is", "of", "number"]
LABELS = ["fruit", "colour", "vehicle"]


CORPUS = [f"Input: {a} {b} {c}\nAnswer: {lab}" for a in WORDS for b in WORDS[:4] for c in ("1", "2") for lab in LABELS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS, vocab_size=320)


def tiny_lm(tok, *, seed=0, layers=2, hidden=16, vocab=None):
    return tiny_gemma(tok, seed=seed, layers=layers, hidden=hidden, vocab=vocab)


def pairs(n=16):
    return [(f"e{i}", f"Input: {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % 4]} {i % 2 + 1}\nAnswer:",
             " " + LABELS[i % 3]) for i in range(n)]


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny_lm(tok, seed=0, layers=3, hidden=24).eval()


@pytest.fixture(scope="module")
def encoded(tok):
    return encode_examples(tok, pairs(16), max_length=64)


# ------------------------------------------------------------------------------------------------ losses


def _direct(p, q, kind, beta=0.5, alpha=0.1):
    """Textbook formulas on probability vectors (float64)."""
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_fkl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, alpha * q + (1 - alpha) * p)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_matches_direct_computation(kind, temperature):
    torch.manual_seed(1)
    s, t = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3
    p = F.softmax(t.double() / temperature, -1)
    q = F.softmax(s.double() / temperature, -1)
    got = dense_divergence(s, t, kind, temperature=temperature, beta=0.3, alpha=0.2)
    want = _direct(p, q, kind, beta=0.3, alpha=0.2)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    assert (got >= -1e-6).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl_generalized_jsd(beta, temperature):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(2)
    s, t = torch.randn(2, 5, 30) * 2, torch.randn(2, 5, 30) * 2
    labels = torch.zeros(2, 5, dtype=torch.long)
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    mine = dense_divergence(s.reshape(-1, 30), t.reshape(-1, 30), "jsd", beta=beta, temperature=temperature).mean()
    assert mine.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    # The same on the k + 1 buckets of a sparse teacher: TRL's loss on bucketed log-probs (log_softmax is the
    # identity on normalised log-probs) equals ours.
    rows_s, rows_t = s.reshape(-1, 30), t.reshape(-1, 30)
    tg = topk_targets(rows_t, 5, temperature)
    sb = student_bucket_logprobs(rows_s, tg.idx, temperature)
    ref_b = GKDTrainer.generalized_jsd_loss(sb[None], tg.buckets()[None], labels=torch.zeros(1, 10, dtype=torch.long),
                                            beta=beta)
    mine_b = sparse_divergence(rows_s, tg, "jsd", beta=beta, temperature=temperature).mean()
    assert mine_b.item() == pytest.approx(ref_b.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_teacher_divergence(kind):
    torch.manual_seed(3)
    s = (torch.randn(5, 50) * 3).requires_grad_()
    t = torch.randn(5, 50) * 3
    # k = V: the buckets are the vocabulary (rest bucket empty): identical to the dense loss, gradients finite.
    full = sparse_divergence(s, topk_targets(t, 50), kind)
    assert torch.allclose(full, dense_divergence(s, t, kind), atol=1e-5)
    full.sum().backward()
    assert torch.isfinite(s.grad).all()
    # k < V: the divergence of the two distributions coarse-grained onto {top-k tokens, rest}.
    k = 7
    p, q = F.softmax(t.double(), -1), F.softmax(s.detach().double(), -1)
    idx = p.topk(k, -1).indices
    pb = torch.cat([p.gather(-1, idx), 1 - p.gather(-1, idx).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, idx), 1 - q.gather(-1, idx).sum(-1, keepdim=True)], -1)
    got = sparse_divergence(s.detach(), topk_targets(t, k), kind)
    assert torch.allclose(got.double(), _direct(pb, qb, kind), rtol=1e-4, atol=1e-5)
    # Coarse-graining never increases a divergence (data-processing inequality).
    assert (got <= dense_divergence(s.detach(), t, kind) + 1e-5).all()


def test_topk_rest_mass_is_exact():
    t = torch.tensor([[10.0, 9.0, -30.0, -31.0, -32.0]])
    tg = topk_targets(t, 2)
    p = F.softmax(t.double(), -1)
    assert tg.rest.item() == pytest.approx(math.log(p[0, 2:].sum().item()), rel=1e-6)  # ~ -39: 1 - sum would be 0
    assert (tg.logp.exp().sum() + tg.rest.exp()).item() == pytest.approx(1.0, abs=1e-6)


def test_hint_losses_and_layer_maps():
    torch.manual_seed(4)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(hint_loss(a, b, "mse"), ((a - b) ** 2).mean(-1))
    assert torch.allclose(hint_loss(a, b, "cosine"), 1 - F.cosine_similarity(a, b, dim=-1), atol=1e-6)
    assert hint_loss(a, 3 * a, "cosine").abs().max() < 1e-5
    assert uniform_layer_map(9, 18) == [(i, 2 * i) for i in range(1, 10)]
    assert uniform_layer_map(4, 8, 2) == [(2, 4), (4, 8)]
    assert parse_layer_map("1:2,2:4", 2, 4) == [(1, 2), (2, 4)]
    with pytest.raises(ConfigError):
        parse_layer_map("3:9", 2, 4)


# ------------------------------------------------------------------------------------------------ cache


def _answer_logits(model, encoded, pad_id):
    with torch.no_grad():
        b = left_pad(encoded, pad_id)
        logits, _ = answer_forward(model, b)
        return logits[b["labels"] != -100]


def test_answer_forward_matches_full_forward(tok, teacher, encoded):
    e = encoded[3]
    with torch.no_grad():
        full = teacher(input_ids=torch.tensor([e.ids])).logits[0]
    want = full[len(e.prompt_ids) - 1 : len(e.ids) - 1]
    got = _answer_logits(teacher, encoded[:5], tok.pad_token_id)
    start = sum(len(x.answer_ids) for x in encoded[:3])
    assert torch.allclose(got[start : start + len(e.answer_ids)], want, atol=1e-4)


def test_cache_round_trip(tok, teacher, encoded, tmp_path):
    cache, stats = build_logit_cache(teacher, encoded, tmp_path, teacher_id="t", k=8, vocab_size=len(tok),
                                     shard_size=5, batch_size=3, pad_id=tok.pad_token_id, progress=False)
    assert stats.computed == [0, 1, 2, 3] and len(cache) == 16
    ref = topk_targets(_answer_logits(teacher, encoded, tok.pad_token_id), 8)
    row = 0
    for i, e in enumerate(encoded):
        got = cache.get(i)["targets"]
        n = len(e.answer_ids)
        assert got.idx.shape == (n, 8)
        assert torch.equal(got.idx, ref.idx[row : row + n])
        assert torch.allclose(got.logp, ref.logp[row : row + n], atol=1e-4)
        assert torch.allclose(got.rest, ref.rest[row : row + n], atol=1e-4)
        # The rest bucket holds exactly the mass outside the top-k.
        assert torch.allclose(got.logp.exp().sum(-1) + got.rest.exp(), torch.ones(n), atol=1e-5)
        row += n


class CountingTeacher(torch.nn.Module):
    """Wraps a model; counts forwards and can raise KeyboardInterrupt after `stop_after` of them."""

    def __init__(self, model, stop_after=None):
        super().__init__()
        self.inner, self.stop_after, self.calls = model, stop_after, 0
        self.config = model.config

    def forward(self, **kw):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(**kw)


def test_cache_interrupt_and_resume(tok, teacher, encoded, tmp_path):
    kw = dict(teacher_id="t", k=6, vocab_size=len(tok), shard_size=4, batch_size=2, pad_id=tok.pad_token_id,
              progress=False)
    # 4 shards of 4 examples, 2 forwards each: interrupted in the middle of shard 2.
    with pytest.raises(KeyboardInterrupt):
        build_logit_cache(CountingTeacher(teacher, stop_after=5), encoded, tmp_path, **kw)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not list(folder.glob(".*.tmp"))  # no half-written shard left behind
    resumed = CountingTeacher(teacher)
    cache, stats = build_logit_cache(resumed, encoded, tmp_path, **kw)
    assert stats.skipped == [0, 1] and stats.computed == [2, 3] and resumed.calls == 4
    fresh, _ = build_logit_cache(teacher, encoded, tmp_path / "fresh", **kw)
    for i in range(len(encoded)):
        a, b = cache.get(i)["targets"], fresh.get(i)["targets"]
        assert torch.equal(a.idx, b.idx) and torch.allclose(a.logp, b.logp)

    def must_not_load():
        raise AssertionError("a finished cache must not load the teacher")

    again, stats = build_logit_cache(must_not_load, encoded, tmp_path, **kw)
    assert stats.computed == [] and stats.skipped == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocab_same_family_padded_ok_different_refused(tok):
    assert check_vocab(tok, tok, len(tok), len(tok)).size == len(tok)
    plan = check_vocab(tok, tok, len(tok) + 16, len(tok))  # student's head padded by 16 rows
    assert plan.size == len(tok) and "truncated" in plan.note
    other = tiny_tokenizer([f"completely different text {w} zebra {i}" for w in WORDS for i in range(30)], vocab_size=360)
    with pytest.raises(ConfigError) as err:
        check_vocab(tok, other, len(tok), len(other))
    msg = str(err.value)
    assert f"student tokenizer {len(tok)} tokens" in msg and "teacher tokenizer" in msg
    assert "id " in msg and " vs teacher " in msg


def test_padded_student_vocab_trains(tok, teacher, encoded, tmp_path):
    cache, _ = build_logit_cache(teacher, encoded, tmp_path, teacher_id="t", k=8, vocab_size=len(tok),
                                 pad_id=tok.pad_token_id, progress=False)
    student = tiny_lm(tok, seed=5, vocab=len(tok) + 16)
    cfg = KDConfig(ce_weight=0.0, top_k=8, lora=False, learning_rate=5e-3, batch_size=8, max_steps=3)
    res = train_kd(student, tok, encoded, cfg, output_dir=tmp_path / "out", cache=cache, vocab_size=len(tok))
    assert res.steps == 3 and all(math.isfinite(h["loss"]) for h in res.log_history if "loss" in h)


# ------------------------------------------------------------------------------------------------ training


def _kl_to_teacher(student, teacher, encoded, pad_id):
    s = _answer_logits(student, encoded, pad_id)
    t = _answer_logits(teacher, encoded, pad_id)
    return dense_divergence(s, t, "fkl").mean().item()


@pytest.fixture(scope="module")
def shared_cache(tok, teacher, encoded, tmp_path_factory):
    cache, _ = build_logit_cache(teacher, encoded, tmp_path_factory.mktemp("cache"), teacher_id="t", k=16,
                                 vocab_size=len(tok), pad_id=tok.pad_token_id, progress=False)
    return cache


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_student_moves_towards_teacher(kind, tok, teacher, encoded, shared_cache, tmp_path):
    student = tiny_lm(tok, seed=7)
    before_params = {n: p.detach().clone() for n, p in student.named_parameters()}
    before = _kl_to_teacher(student, teacher, encoded, tok.pad_token_id)
    cfg = KDConfig(divergence=kind, ce_weight=0.0, top_k=16, lora=False, learning_rate=1e-2, batch_size=8,
                   max_steps=8, alpha=0.1, beta=0.5, logging_steps=1)
    res = train_kd(student, tok, encoded, cfg, output_dir=tmp_path, cache=shared_cache)
    after = _kl_to_teacher(res.model, teacher, encoded, tok.pad_token_id)
    assert after < 0.8 * before, (kind, before, after)
    unchanged = [n for n, p in res.model.named_parameters() if p.requires_grad and torch.equal(p, before_params[n])]
    assert not unchanged
    assert res.tokens > 0 and res.tokens_per_s > 0


def test_lora_student_every_adapter_changes(tok, teacher, encoded, shared_cache, tmp_path):
    student = tiny_lm(tok, seed=8)
    cfg = KDConfig(divergence="fkl", ce_weight=0.0, top_k=16, lora=True, lora_r=4, learning_rate=2e-2, batch_size=8,
                   max_steps=6)
    from stillroom.kd.trainer import apply_lora

    model = apply_lora(student, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    kl0 = _kl_to_teacher(model, teacher, encoded, tok.pad_token_id)
    res = train_kd(model, tok, encoded, cfg, output_dir=tmp_path, cache=shared_cache)
    after = {n: p for n, p in res.model.named_parameters() if p.requires_grad}
    assert before and all(not torch.equal(after[n], before[n]) for n in before)
    assert all("lora" in n for n in before)
    assert _kl_to_teacher(res.model, teacher, encoded, tok.pad_token_id) < kl0


def test_trainer_loss_equals_formula(tok, teacher, encoded, shared_cache, tmp_path):
    """The logged loss is (1 − w)·T²·KD + w·CE over answer tokens, computed here from full-sequence logits."""
    from stillroom.kd.trainer import KDCollator, KDDataset

    cfg = KDConfig(divergence="fkl", ce_weight=0.25, temperature=2.0, top_k=16, lora=False, batch_size=4)
    with pytest.raises(ConfigError):  # the cache was built at T = 1
        train_kd(tiny_lm(tok), tok, encoded, cfg, output_dir=tmp_path, cache=shared_cache)
    cache2, _ = build_logit_cache(teacher, encoded, tmp_path / "t2", teacher_id="t", k=16, temperature=2.0,
                                  vocab_size=len(tok), pad_id=tok.pad_token_id, progress=False)
    student = tiny_lm(tok, seed=9)
    trainer = KDTrainer(model=student, args=training_arguments(cfg, tmp_path / "o"),
                        train_dataset=KDDataset(encoded, cache2), data_collator=KDCollator(tok.pad_token_id),
                        kd=cfg, vocab_size=len(tok))
    batch = KDCollator(tok.pad_token_id)([KDDataset(encoded, cache2)[i] for i in range(4)])
    loss = trainer.compute_loss(student, batch).item()
    # Direct: one unpadded full forward per example.
    kd_terms, ce_terms = [], []
    with torch.no_grad():
        for e in encoded[:4]:
            s = student(input_ids=torch.tensor([e.ids])).logits[0, len(e.prompt_ids) - 1 : len(e.ids) - 1]
            t = teacher(input_ids=torch.tensor([e.ids])).logits[0, len(e.prompt_ids) - 1 : len(e.ids) - 1]
            kd_terms.append(sparse_divergence(s, topk_targets(t, 16, 2.0), "fkl", temperature=2.0))
            ce_terms.append(F.cross_entropy(s, torch.tensor(e.answer_ids), reduction="none"))
    want = (0.75 * 4.0 * torch.cat(kd_terms) + 0.25 * torch.cat(ce_terms)).mean().item()
    assert loss == pytest.approx(want, rel=1e-4)


def test_online_teacher_gives_the_cached_loss(tok, teacher, encoded, shared_cache, tmp_path):
    from stillroom.kd.trainer import KDCollator, KDDataset

    student = tiny_lm(tok, seed=10)
    cached_cfg = KDConfig(top_k=16, lora=False, ce_weight=0.1)
    online_cfg = KDConfig(top_k=16, lora=False, ce_weight=0.1, teacher_mode="online")
    items = [KDDataset(encoded, shared_cache)[i] for i in range(6)]
    t1 = KDTrainer(model=student, args=training_arguments(cached_cfg, tmp_path / "a"), kd=cached_cfg,
                   train_dataset=KDDataset(encoded, shared_cache), data_collator=KDCollator(tok.pad_token_id))
    t2 = KDTrainer(model=student, args=training_arguments(online_cfg, tmp_path / "b"), kd=online_cfg, teacher=teacher,
                   train_dataset=KDDataset(encoded), data_collator=KDCollator(tok.pad_token_id))
    cached = t1.compute_loss(student, KDCollator(tok.pad_token_id)(items)).item()
    online = t2.compute_loss(student, KDCollator(tok.pad_token_id)([{**it, "cached": None} for it in items])).item()
    assert online == pytest.approx(cached, rel=1e-4)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_hints_train_projector_and_student(positions, tok, teacher, encoded, tmp_path):
    from stillroom.kd.trainer import hint_meta

    layer_map = parse_layer_map("uniform", 2, 3)
    cache, _ = build_logit_cache(teacher, encoded, tmp_path, teacher_id="t", k=8, vocab_size=len(tok),
                                 pad_id=tok.pad_token_id, hint_layers=[t for _, t in layer_map],
                                 hint_positions=positions, extra_meta=hint_meta(layer_map, teacher.config),
                                 progress=False)
    h = cache.get(0)["hidden"][layer_map[0][1]]
    n = len(encoded[0].answer_ids) if positions == "answer" else len(encoded[0].ids)
    assert h.shape == (n, 24)
    student = tiny_lm(tok, seed=11)
    cfg = KDConfig(top_k=8, lora=False, learning_rate=1e-2, batch_size=8, max_steps=6, logging_steps=1,
                   hints={"enabled": True, "metric": "mse", "weight": 1.0, "positions": positions})
    seen = {}

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = {n: p.detach().clone() for n, p in model.kd_projector.named_parameters()}
            seen["proj"] = model.kd_projector

    res = train_kd(student, tok, encoded, cfg, output_dir=tmp_path / "o", cache=cache, callbacks=[Grab()])
    hints = [x["kd/hint"] for x in res.log_history if "kd/hint" in x]
    assert len(hints) >= 5 and hints[-1] < hints[0]
    assert all(not torch.equal(p, seen["before"][n]) for n, p in seen["proj"].named_parameters())
    assert not hasattr(res.model, "kd_projector")  # removed before the student is saved


def test_on_policy_through_trl_distillation_trainer(tok, teacher, tmp_path):
    from stillroom.kd.trainer import train_on_policy

    student = tiny_lm(tok, seed=12)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = KDConfig(divergence="rkl", lora=False, learning_rate=1e-2, batch_size=4, max_steps=2, logging_steps=1)
    prompts = [p for _, p, _ in pairs(8)]
    res = train_on_policy(student, teacher, tok, prompts, cfg, output_dir=tmp_path, max_completion_length=4)
    assert res.steps == 2
    assert any(not torch.equal(p, before[n]) for n, p in res.model.named_parameters())
    with pytest.raises(ConfigError):
        train_on_policy(student, teacher, tok, prompts, KDConfig(divergence="tvd"), output_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ routes


@pytest.fixture(scope="module")
def model_dirs(tok, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    from stillroom.backends.embedded import save_model_folder

    save_model_folder(teacher, tok, root / "teacher")
    save_model_folder(tiny_lm(tok, seed=13), tok, root / "student")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(30)))
    return root


def test_kd_data_scripted_teacher_resumes_free(tok, model_dirs, tmp_path):
    from stillroom.backends.scripted import ScriptedBackend
    from stillroom.config import TaskConfig
    from stillroom.kd.data import KDDataConfig, distill_data
    from stillroom.tasks import load_task

    gold = {ex.input: ex.label for ex in load_task(str(model_dirs / "task.jsonl")).examples}

    def even(text):
        return int(text.split()[-1]) % 2 == 0

    def answer(prompt, params):  # right on even numbers, wrong on odd: the filter must drop the wrong ones
        text = prompt[-1]["content"].removeprefix("Input: ")
        lab = gold[text]
        return lab if even(text) else LABELS[(LABELS.index(lab) + 1) % 3]

    cfg = KDDataConfig(task=TaskConfig(spec=str(model_dirs / "task.jsonl")), student=str(model_dirs / "student"),
                       mode="answers", max_steps=2, batch_size=4, eval_limit=6, eval_before=False)
    be = ScriptedBackend(answer)
    m = distill_data(cfg, tmp_path, teacher_backend=be)
    rows = [json.loads(x) for x in (tmp_path / "teacher_outputs.jsonl").read_text().splitlines()]
    assert be.calls == len(rows) > 0
    assert all(r["kept"] == r["correct"] == even(r["input"]) for r in rows)
    sft = [json.loads(x) for x in (tmp_path / "sft_data.jsonl").read_text().splitlines()]
    assert len(sft) == m["data"]["kept"] and all(s["completion"].strip() in LABELS for s in sft)
    assert (tmp_path / "student" / "config.json").exists() and m["conditions"]["student (answers KD)"]["n"] == 6
    be2 = ScriptedBackend(answer)
    m2 = distill_data(cfg, tmp_path, teacher_backend=be2)
    assert be2.calls == 0 and m2["data"]["teacher_calls_cached"] == len(rows)


def test_kd_logits_cli_end_to_end_and_resume(model_dirs, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from stillroom.kd.cli import register

    app = typer.Typer()
    register(app)
    args = ["kd", "logits", "--task", str(model_dirs / "task.jsonl"), "--teacher", f"hf:{model_dirs / 'teacher'}",
            "--student", str(model_dirs / "student"), "--divergence", "jsd", "--top-k", "8", "--full",
            "--max-steps", "2", "--batch-size", "4", "--eval-limit", "6", "--run-dir", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["conditions"]) == {"student (no KD)", "student (KD)"}
    assert m["train"]["steps"] == 2 and m["train"]["cache"]["computed_shards"] == [0]
    import stillroom.kd.trainer as trainer_mod

    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "teacher_logits").rglob("*.safetensors")}
    loaded = []
    real_load = trainer_mod.load_causal_lm
    monkeypatch.setattr(trainer_mod, "load_causal_lm", lambda path, **kw: (loaded.append(str(path)), real_load(path, **kw))[1])
    monkeypatch.setattr(trainer_mod, "train_kd", lambda *a, **k: pytest.fail("a finished student was retrained"))
    res = CliRunner().invoke(app, args)  # rerun: no shard computed, teacher not loaded, nothing retrained
    assert res.exit_code == 0, res.output
    assert not any("teacher" in p for p in loaded) and loaded  # the student (before and after) was loaded
    assert shards and {p: p.stat().st_mtime_ns for p in shards} == shards
    monkeypatch.undo()
    hints = CliRunner().invoke(app, ["kd", "hints", *args[2:-1], str(tmp_path / "hints"), "--metric", "cosine",
                                     "--layer-map", "uniform:1"])
    assert hints.exit_code == 0, hints.output
    hm = json.loads((tmp_path / "hints" / "metrics.json").read_text())
    assert hm["train"]["steps"] == 2 and (tmp_path / "hints" / "student" / "config.json").exists()
    cache_meta = next((tmp_path / "hints" / "teacher_logits").glob("*/meta.json"))
    assert json.loads(cache_meta.read_text())["hint_student_layers"] == [2]
    bad = CliRunner().invoke(app, ["kd", "logits", "--task", str(model_dirs / "task.jsonl"), "--teacher",
                                   "openai:gpt-4o", "--student", str(model_dirs / "student"), "--run-dir",
                                   str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "stillroom kd data" in bad.output


def test_kd_data_cot_records_and_demos(tok, model_dirs, tmp_path):
    from stillroom.backends.scripted import ScriptedBackend
    from stillroom.config import TaskConfig
    from stillroom.kd.data import KDDataConfig, collect_teacher_outputs, distill_data, sft_records
    from stillroom.tasks import load_task
    from stillroom.tasks.prompts import chat_to_text

    task = load_task(str(model_dirs / "task.jsonl"))
    gold = {ex.input: ex.label for ex in task.examples}

    def reason(prompt, params):
        text = prompt[-1]["content"].removeprefix("Input: ")
        return f"The word {text.split()[0]} suggests it.\nAnswer: {gold[text]}"

    exs = task.examples[:4]
    rows = collect_teacher_outputs(task, exs, ScriptedBackend(reason), mode="cot", max_tokens=64)
    assert all(r["kept"] and r["answer"] == ex.label for r, ex in zip(rows, exs, strict=True))
    recs = sft_records(task, exs, rows, mode="cot", render=chat_to_text)
    assert all(r["prompt"].endswith("Answer:") and "Think step by step" in r["prompt"] for r in recs)
    assert all(r["completion"].startswith(" The word") and r["completion"].endswith(ex.label)
               for r, ex in zip(recs, exs, strict=True))
    cfg = KDDataConfig(task=TaskConfig(spec=str(model_dirs / "task.jsonl")), student=str(model_dirs / "student"),
                       mode="demos", demos=3, eval_limit=4)
    m = distill_data(cfg, tmp_path, teacher_backend=ScriptedBackend(lambda p, _: gold[p[-1]["content"][7:]]))
    demos = [json.loads(x) for x in (tmp_path / "demos.jsonl").read_text().splitlines()]
    assert len(demos) == 3 and all(d["label"] == gold[d["input"]] for d in demos)
    assert set(m["conditions"]) == {"student (no KD)", "student + 3 teacher demos"}
    assert not (tmp_path / "student").exists()  # demos mode trains nothing
