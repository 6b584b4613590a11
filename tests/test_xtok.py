"""Logit distillation across tokenizers, on tiny models built in-process with genuinely different tokenizers: a
ByteLevel BPE teacher (like Qwen's) and a SentencePiece-style student with byte fallback (like Gemma's).

Every aligned span spells the same bytes on both sides (CJK, emoji, accents, leading spaces, byte-fallback
pieces), and spans are minimal; byte offsets agree with TRL's on the ByteLevel side; the ULD loss equals TRL's
`ULDLoss` (plain and hybrid) when the cache's k covers the teacher's whole vocabulary; the cross-tokenizer cache
resumes after a kill without rewriting a finished shard; training brings the loss down.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("trl")

from conftest import tiny_gemma, tiny_llama, tiny_sp_tokenizer, tiny_tokenizer  # noqa: E402

from stillroom.errors import ConfigError  # noqa: E402
from stillroom.kd.logit_cache import build_logit_cache  # noqa: E402
from stillroom.kd.uld import uld_span_losses  # noqa: E402
from stillroom.kd.xtok import TokenBytes, align, byte_offsets, shared_vocabulary, span_bytes  # noqa: E402
from stillroom.kd.xtok_train import (  # noqa: E402
    CrossCollator,
    CrossDataset,
    XTokConfig,
    encode_cross,
    shared_vocab_for,
    span_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "Hello world, naïve café résumé",
    "東京は日本の首都です",
    "I love 🍕 and 🎉!",
    " leading spaces  here",
    "Ünïcödé façade — déjà vu",
    "新しい 😀 ñandú",
    "Straße, crème brûlée, 北京烤鸭 👩‍💻",
]
LABELS = ["café noir", "東京タワー", "🍕 pizza", "naïve über", "déjà vu 😀"]
WORDS = ["red", "green", "über", "日本", "🎉", "crème", "the", "of"]
PAIRS = [(f"ex{i}", f"Input: {a} {b}\nAnswer:", " " + lab)
         for i, (a, b, lab) in enumerate((a, b, LABELS[(i + j) % len(LABELS)])
                                         for i, a in enumerate(WORDS) for j, b in enumerate(WORDS[:3]))]
CORPUS = TEXTS + [p for _, p, _ in PAIRS]  # answers left out: the tokenizers split them differently


@pytest.fixture(scope="module")
def t_tok():
    return tiny_tokenizer(CORPUS, vocab_size=330)  # ByteLevel BPE (teacher, like Qwen)


@pytest.fixture(scope="module")
def s_tok():
    return tiny_sp_tokenizer(CORPUS, vocab_size=180, limit_alphabet=40)  # SentencePiece + byte fallback (student)


@pytest.fixture(scope="module")
def teacher(t_tok):
    return tiny_llama(t_tok, seed=1, hidden=32).eval()


@pytest.fixture(scope="module")
def examples(s_tok, t_tok):
    return encode_cross(s_tok, t_tok, PAIRS, max_length=64)


# ------------------------------------------------------------------------------------------------ alignment


def test_tokenizers_differ_and_exercise_byte_fallback(s_tok, t_tok):
    sb, tb = TokenBytes(s_tok), TokenBytes(t_tok)
    assert (sb.scheme, tb.scheme) == ("sentencepiece", "bytelevel")
    pieces = [p for text in TEXTS for p in s_tok.convert_ids_to_tokens(s_tok.encode(text, add_special_tokens=False))]
    assert any(p.startswith("<0x") for p in pieces)  # byte-fallback pieces occur in the corpus
    assert s_tok.encode(TEXTS[0]) != t_tok.encode(TEXTS[0])


@pytest.mark.parametrize("text", TEXTS)
def test_every_span_spells_the_same_bytes(text, s_tok, t_tok):
    sb, tb = TokenBytes(s_tok), TokenBytes(t_tok)
    s_ids, t_ids = s_tok.encode(text), t_tok.encode(text)  # with BOS: a special token has no bytes
    s_bytes, t_bytes = [sb[i] for i in s_ids], [tb[i] for i in t_ids]
    s_off, t_off = byte_offsets(s_bytes, text), byte_offsets(t_bytes, text)
    spans = align(s_off, t_off)
    assert b"".join(span_bytes(s_bytes, sg) for sg, _ in spans) == text.encode()
    for sg, tg in spans:
        assert span_bytes(s_bytes, sg) == span_bytes(t_bytes, tg)
        # Minimal: no boundary inside the span is common to both sides.
        inner_s = {s_off[i][1] for i in sg[:-1]}
        inner_t = {t_off[i][1] for i in tg[:-1]}
        assert not (inner_s & inner_t - {s_off[sg[-1]][1]})
    # Contiguous: every token of both sides is in exactly one span.
    assert [i for sg, _ in spans for i in sg] == list(range(len(s_ids)))
    assert [i for _, tg in spans for i in tg] == list(range(len(t_ids)))


def test_offsets_agree_with_trl_on_bytelevel(t_tok):
    from trl.experimental.utils import encode_with_byte_offsets

    tb = TokenBytes(t_tok)
    for text in TEXTS:
        [(ids, trl_off)] = encode_with_byte_offsets(t_tok.backend_tokenizer, [text], add_special_tokens=False)
        assert byte_offsets([tb[i] for i in ids], text) == [tuple(o) for o in trl_off]


def test_tokens_that_do_not_spell_the_text_are_refused(t_tok):
    tb = TokenBytes(t_tok)
    ids = t_tok.encode("café", add_special_tokens=False)
    with pytest.raises(ConfigError, match="example 'x'.*spell"):
        byte_offsets([tb[i] for i in ids], "cafe", where="example 'x'")


def test_answer_spans_align_and_shared_vocabulary_matches_bytes(examples, s_tok, t_tok):
    sb, tb = TokenBytes(s_tok), TokenBytes(t_tok)
    multi = 0
    for x in examples:
        s_b = [sb[i] for i in x.student.answer_ids]
        t_b = [tb[i] for i in x.teacher.answer_ids]
        assert x.plan.student and len(x.plan.student) == len(x.plan.teacher)
        for sg, tg in zip(x.plan.student, x.plan.teacher, strict=True):
            assert span_bytes(s_b, sg) == span_bytes(t_b, tg)
            multi += len(sg) > 1 or len(tg) > 1
        # Both answers end with EOS, paired as the last span (the stop decision).
        assert x.plan.student[-1] == [len(s_b) - 1] and x.plan.teacher[-1] == [len(t_b) - 1]
    assert multi > 0  # some spans merge several tokens on a side
    mapping = shared_vocabulary(sb, tb)
    assert mapping and all(tb[t] == sb[s] and tb[t] for t, s in mapping.items())


# ------------------------------------------------------------------------------------------------ loss vs TRL


def _trl_uld(hybrid: bool, s_tok, t_tok, mapping=None, beta=0.5):
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.3,
                          uld_teacher_temperature=0.8, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                          use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=hybrid,
                          uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=beta)
    loss = ULDLoss(cfg, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    if hybrid:
        # TRL matches raw vocabulary strings; Stillroom matches token bytes. Same mapping on both sides of the test.
        loss._vocab_mapping = dict(mapping)
        loss._teacher_matched_ids, loss._student_matched_ids = set(mapping), set(mapping.values())
        loss.mapping_tensor = torch.full((max(mapping) + 1,), -1, dtype=torch.long)
        for t, s in mapping.items():
            loss.mapping_tensor[t] = s
    return loss


def _full_inputs(model, enc):
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    labels = ids.clone()
    labels[0, : len(enc.prompt_ids)] = -100
    offs = torch.zeros(1, len(enc.ids), 2, dtype=torch.long)
    offs[0, len(enc.prompt_ids) :] = torch.tensor(enc.meta["byte_offsets"])
    return ids, logits, labels, offs


@pytest.mark.parametrize("hybrid", [False, True])
def test_uld_equals_trl_uldloss_with_whole_vocabulary(hybrid, examples, s_tok, t_tok, teacher, tmp_path):
    student = tiny_gemma(s_tok, seed=3, hidden=16)
    v_t = teacher.config.vocab_size
    # k = the teacher's whole vocabulary: the cache holds its full distribution, as TRL sees it.
    cache, _ = build_logit_cache(teacher, [x.teacher for x in examples], tmp_path, teacher_id="t", k=v_t,
                                 temperature=0.8, shard_size=8, pad_id=t_tok.pad_token_id, progress=False, xtok=True)
    shared = shared_vocab_for(s_tok, t_tok, student_vocab=student.config.vocab_size, teacher_vocab=v_t)
    mapping = shared_vocabulary(TokenBytes(s_tok), TokenBytes(t_tok))
    trl_loss = _trl_uld(hybrid, s_tok, t_tok, mapping, beta=0.3)
    ds, coll = CrossDataset(examples, cache), CrossCollator(pad_id=s_tok.pad_token_id)
    checked = 0
    for i in range(0, len(examples), 5):
        x = examples[i]
        batch = coll([ds[i]])
        s_ids, s_logits, s_labels, s_offs = _full_inputs(student, x.student)
        t_ids, t_logits, t_labels, t_offs = _full_inputs(teacher, x.teacher)
        want = trl_loss(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_offs, t_offs)
        n_a = len(x.student.answer_ids)
        rows = s_logits[0, -n_a - 1 : -1]
        got = uld_span_losses(rows, torch.tensor(x.student.answer_ids), span_batch(batch), temperature=1.3,
                              shared=shared if hybrid else None, beta=0.3)
        # TRL's reduction: the mean over one example's aligned spans.
        assert float(got.mean()) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
        checked += 1
    assert checked >= 4


def test_topk_cache_is_a_lower_bound_of_full_uld(examples, s_tok, t_tok, teacher, tmp_path):
    student = tiny_gemma(s_tok, seed=4, hidden=16)
    full, _ = build_logit_cache(teacher, [x.teacher for x in examples], tmp_path / "full", teacher_id="t",
                                k=teacher.config.vocab_size, progress=False, pad_id=t_tok.pad_token_id, xtok=True)
    small, _ = build_logit_cache(teacher, [x.teacher for x in examples], tmp_path / "small", teacher_id="t", k=8,
                                 progress=False, pad_id=t_tok.pad_token_id, xtok=True)
    coll = CrossCollator(pad_id=s_tok.pad_token_id)
    x = examples[0]
    rows = student(input_ids=torch.tensor([x.student.ids])).logits[0, -len(x.student.answer_ids) - 1 : -1]
    toks = torch.tensor(x.student.answer_ids)
    a = uld_span_losses(rows, toks, span_batch(coll([CrossDataset(examples, full)[0]])))
    b = uld_span_losses(rows, toks, span_batch(coll([CrossDataset(examples, small)[0]])))
    assert torch.all(b <= a + 1e-6) and torch.all(b > 0)


# ------------------------------------------------------------------------------------------------ cache, training


class KilledTeacher(torch.nn.Module):
    """Wraps a model; raises KeyboardInterrupt (a kill) after `stop_after` forwards; counts forwards."""

    def __init__(self, model, stop_after=None):
        super().__init__()
        self.inner, self.stop_after, self.calls = model, stop_after, 0
        self.config = model.config

    def forward(self, **kw):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(**kw)


def test_cross_cache_resumes_without_rewriting_a_shard(examples, teacher, t_tok, tmp_path):
    enc = [x.teacher for x in examples]
    kw = dict(teacher_id="t", k=8, shard_size=6, batch_size=3, pad_id=t_tok.pad_token_id, progress=False, xtok=True)
    n_shards = (len(enc) + 5) // 6
    with pytest.raises(KeyboardInterrupt):
        build_logit_cache(KilledTeacher(teacher, stop_after=3), enc, tmp_path, **kw)  # killed inside shard 1
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*")}
    assert list(done) == ["shard-00000.safetensors"] and not list(folder.glob(".*.tmp"))
    resumed = KilledTeacher(teacher)
    cache, stats = build_logit_cache(resumed, enc, tmp_path, **kw)
    assert stats.skipped == [0] and stats.computed == list(range(1, n_shards))
    assert resumed.calls == 2 * (n_shards - 1)  # shard 0's rows were not recomputed
    p0 = folder / "shard-00000.safetensors"
    assert (p0.stat().st_ino, p0.stat().st_mtime_ns) == done[p0.name]  # nor rewritten
    assert cache.xtok
    for i, e in enumerate(enc):
        got = cache.get(i)
        assert got["byte_offsets"].tolist() == [list(o) for o in e.meta["byte_offsets"]]
        assert got["tok_logp"].shape == (len(e.answer_ids),) and torch.all(got["tok_logp"] <= 0)


@pytest.mark.parametrize("merge,hybrid", [("bayesian", False), ("observed", True)])
def test_training_brings_the_loss_down(merge, hybrid, examples, s_tok, t_tok, teacher, tmp_path):
    from stillroom.kd.trainer import KDConfig, train_xtok

    cache, _ = build_logit_cache(teacher, [x.teacher for x in examples], tmp_path / "cache", teacher_id="t", k=16,
                                 pad_id=t_tok.pad_token_id, progress=False, xtok=True)
    student = tiny_gemma(s_tok, seed=5, hidden=16)
    weights = {"hybrid_matched_weight": 1.0, "hybrid_unmatched_weight": 1.0} if hybrid else {}
    xcfg = XTokConfig(merge=merge, hybrid=hybrid, **weights)
    shared = shared_vocab_for(s_tok, t_tok, student_vocab=student.config.vocab_size,
                              teacher_vocab=teacher.config.vocab_size)
    coll = CrossCollator(pad_id=s_tok.pad_token_id, merge=merge)
    batch = coll([CrossDataset(examples, cache)[i] for i in range(len(examples))])

    def uld_now(model):
        from stillroom.kd.logit_cache import answer_forward

        with torch.no_grad():
            logits, _ = answer_forward(model, batch)
            mask = batch["labels"] != -100
            return float(uld_span_losses(logits[mask], batch["labels"][mask], span_batch(batch),
                                         shared=shared if hybrid else None,
                                         matched_weight=1.0, unmatched_weight=1.0).mean())

    before = uld_now(student)
    cfg = KDConfig(ce_weight=0.0 if hybrid else 0.2, lora=False, learning_rate=1e-2, batch_size=8, max_steps=12, logging_steps=1)
    res = train_xtok(student, s_tok, examples, cfg, xcfg, cache=cache, output_dir=tmp_path / "out", shared=shared)
    after = uld_now(res.model)
    assert res.steps == 12 and after < 0.9 * before, (before, after)
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert res.tokens > 0


def test_served_teacher_fills_the_cross_cache_like_a_local_one(s_tok, t_tok, teacher, tmp_path, monkeypatch):
    """Through vLLM-shaped `prompt_logprobs` and `/tokenize` (ids + pieces): the teacher's ids, top-k, actual-token
    log-probabilities and byte offsets equal the local teacher's."""
    from helpers_vllm_server import VLLMShapedServer

    from stillroom.backends.openai_compat import OpenAIBackend
    from stillroom.kd.served_teacher import ServedTeacher

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    pairs = PAIRS[:7]
    # The server cannot say which id is EOS: the local reference leaves it out too.
    local_x = encode_cross(s_tok, t_tok, pairs, max_length=64, append_eos=False)
    local, _ = build_logit_cache(teacher, [x.teacher for x in local_x], tmp_path / "local", teacher_id="t", k=6,
                                 pad_id=t_tok.pad_token_id, progress=False, xtok=True)
    with VLLMShapedServer(teacher, t_tok) as srv:
        served = ServedTeacher(OpenAIBackend("served-model", base_url=srv.base_url, max_retries=0))
        remote_x = encode_cross(s_tok, served.tokenizer(), pairs, max_length=64)
        remote, stats = build_logit_cache(served, [x.teacher for x in remote_x], tmp_path / "remote",
                                          teacher_id=served.identity, k=6, shard_size=3, batch_size=2,
                                          progress=False, xtok=True)
    assert stats.computed == [0, 1, 2]
    for i, (a_x, b_x) in enumerate(zip(local_x, remote_x, strict=True)):
        assert a_x.teacher.ids == b_x.teacher.ids and a_x.plan == b_x.plan
        a, b = local.get(i), remote.get(i)
        assert torch.equal(a["targets"].idx, b["targets"].idx)
        assert torch.allclose(a["targets"].logp, b["targets"].logp, atol=1e-4)
        assert torch.allclose(a["tok_logp"], b["tok_logp"], atol=1e-4)
        assert torch.equal(a["byte_offsets"], b["byte_offsets"])


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def cross_dirs(s_tok, t_tok, teacher, tmp_path_factory):
    import json

    from stillroom.backends.embedded import save_model_folder

    root = tmp_path_factory.mktemp("xmodels")
    save_model_folder(teacher, t_tok, root / "teacher")
    save_model_folder(tiny_gemma(s_tok, seed=13, hidden=16), s_tok, root / "student")
    (root / "task.jsonl").write_text("".join(
        json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}", "label": LABELS[i % len(LABELS)]},
                   ensure_ascii=False) + "\n" for i in range(30)))
    return root


def test_kd_logits_detects_different_tokenizers_trains_and_resumes(cross_dirs, tmp_path, monkeypatch):
    import json

    import typer
    from typer.testing import CliRunner

    import stillroom.kd.trainer as trainer_mod
    from stillroom.kd.cli import register

    app = typer.Typer()
    register(app)
    args = ["kd", "logits", "--task", str(cross_dirs / "task.jsonl"), "--teacher", f"hf:{cross_dirs / 'teacher'}",
            "--student", str(cross_dirs / "student"), "--top-k", "8", "--full", "--max-steps", "2", "--batch-size",
            "4", "--eval-limit", "4", "--run-dir", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "ULD across tokenizers" in m["method"] and m["train"]["steps"] == 2
    assert m["train"]["cache"]["cross_tokenizer"] and m["train"]["cache"]["computed_shards"] == [0]
    assert any("tokenize differently" in n for n in m["notes"])
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "teacher_logits").rglob("*.safetensors")}
    loaded = []
    real_load = trainer_mod.load_causal_lm
    monkeypatch.setattr(trainer_mod, "load_causal_lm", lambda path, **kw: (loaded.append(str(path)), real_load(path, **kw))[1])
    res = CliRunner().invoke(app, args)  # rerun: nothing recomputed, the teacher not loaded
    assert res.exit_code == 0, res.output
    assert loaded and not any("teacher" in p for p in loaded)
    assert shards and {p: p.stat().st_mtime_ns for p in shards} == shards
    monkeypatch.undo()
    # Forcing the same-vocabulary path on two tokenizers is refused, naming both vocabulary sizes.
    same = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "same"), "--tokenizers", "same"])
    assert same.exit_code != 0
    text = " ".join(same.output.split())
    assert "xtok.mode 'same'" in text and "student vocabulary" in text and "teacher vocabulary" in text
    # Hint KD stays same-architecture and says so.
    hints = CliRunner().invoke(app, ["kd", "hints", *args[2:-1], str(tmp_path / "hints")])
    assert hints.exit_code != 0 and "hint KD" in " ".join(hints.output.split())


def test_compare_plans_kd_logits_for_every_teacher_with_logits(cross_dirs):
    from stillroom.compare.config import CompareConfig
    from stillroom.compare.routes import plan_routes

    def plan(teacher: dict):
        cfg = CompareConfig.model_validate({"task": {"spec": str(cross_dirs / "task.jsonl")}, "teacher": teacher,
                                            "student": {"spec": f"hf:{cross_dirs / 'student'}"},
                                            "routes": ["kd-logits"]})
        return plan_routes(cfg)[0]

    # Different tokenizers are no reason to skip; local weights (hf:, gguf:) and a vLLM server all run.
    for teacher in ({"spec": f"hf:{cross_dirs / 'teacher'}"}, {"spec": "gguf:/models/qwen.gguf"},
                    {"spec": "openai:qwen", "base_url": "http://gpu-node:8000/v1"}):
        p = plan(teacher)
        assert p.skip_reason is None, (teacher, p.skip_reason)
    served = plan({"spec": "openai:qwen", "base_url": "http://gpu-node:8000/v1"}).config
    assert served.teacher.base_url == "http://gpu-node:8000/v1" and served.top_k <= 20
    for teacher in ({"spec": "openai:gpt-4o-mini"}, {"spec": "openai:gpt-4o", "base_url": "https://api.openai.com/v1"}):
        assert "chat-only API" in plan(teacher).skip_reason


# ------------------------------------------------------------------------------------------------ the real pair


QWEN_GGUF = "/tmp/i16/qwen.gguf"


def _qwen_teacher_spec() -> str:
    """The Qwen teacher: the embedded spec where this build has it, else a GGUF file (STILLROOM_QWEN_GGUF)."""
    import os
    from pathlib import Path

    from stillroom.models import EMBEDDED_SPECS

    if "qwen2.5-coder-0.5b" in EMBEDDED_SPECS:
        return "qwen2.5-coder-0.5b"
    f = os.environ.get("STILLROOM_QWEN_GGUF", QWEN_GGUF)
    if not Path(f).is_file():
        pytest.skip(f"no Qwen teacher: no embedded spec and no GGUF at {f}")
    return f"gguf:{f}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_pair_qwen_teacher_gemma_student(tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct (ByteLevel, 151,936 logits) teaches the embedded Gemma-3 270M (SentencePiece,
    262,144 logits) on the demo task, a few steps; a rerun reuses the cache and the student."""
    from stillroom.kd.trainer import KDLogitsConfig, distill_logits

    cfg = KDLogitsConfig.model_validate({
        "task": {"spec": "bigbench:intent_recognition"}, "teacher": _qwen_teacher_spec(), "student": "gemma3-270m",
        "train_limit": 8, "eval_limit": 8, "eval_before": False, "max_steps": 3, "batch_size": 4, "top_k": 16,
        "logging_steps": 1, "max_length": 256})
    m = distill_logits(cfg, tmp_path / "run", progress=False)
    train = m["train"]
    assert "ULD across tokenizers" in m["method"] and train["steps"] == 3
    assert train["cache"]["cross_tokenizer"] and train["cache"]["computed_shards"] == [0]
    assert 0 < train["cache"]["aligned_spans"] <= train["cache"]["student_answer_tokens"]
    import json

    history = json.loads((tmp_path / "run" / "train.json").read_text())["log_history"]
    assert history and all(h["loss"] == h["loss"] for h in history if "loss" in h)  # no NaN
    again = distill_logits(cfg, tmp_path / "run", progress=False)
    assert again["train"]["cache"]["computed_shards"] == [0]  # train.json kept: nothing retrained or recomputed
    assert any("resumed" in n for n in again["notes"])


def test_kd_logits_with_a_served_teacher_of_another_tokenizer(cross_dirs, teacher, t_tok, tmp_path, monkeypatch):
    """A vLLM-shaped teacher whose tokenizer differs from the student's: the probe finds the difference, the
    cache fills through prompt_logprobs and /tokenize, the student trains."""
    import json

    from helpers_vllm_server import VLLMShapedServer

    from stillroom.kd.trainer import KDLogitsConfig, distill_logits

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with VLLMShapedServer(teacher, t_tok) as srv:
        cfg = KDLogitsConfig.model_validate({
            "task": {"spec": str(cross_dirs / "task.jsonl")}, "student": f"hf:{cross_dirs / 'student'}",
            "teacher": {"spec": "openai:served-model", "base_url": srv.base_url, "max_retries": 0},
            "top_k": 6, "lora": False, "max_steps": 2, "batch_size": 4, "eval_limit": 4, "eval_before": False})
        m = distill_logits(cfg, tmp_path / "run", progress=False)
        sent = [body for path, body in srv.requests if path == "/v1/completions"]
    assert "ULD across tokenizers" in m["method"] and m["train"]["steps"] == 2
    assert any("served teacher tokenizes differently" in n for n in m["notes"])
    assert sent and all(s["prompt_logprobs"] == 6 for s in sent)
    meta = json.loads(next((tmp_path / "run" / "teacher_logits").glob("*/meta.json")).read_text())
    assert meta["xtok"] and meta["teacher"].startswith("served:")
