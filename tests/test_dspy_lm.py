"""The DSPy adapter: DSPy programs run on Stillroom backends, through the durable cache, counted."""

import warnings

import pytest

dspy = pytest.importorskip("dspy")

from stillroom.backends.base import GenerationParams  # noqa: E402
from stillroom.backends.scripted import ScriptedBackend  # noqa: E402
from stillroom.integrations.dspy_lm import StillroomLM, generation_params, open_dspy_lm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Judge(dspy.Signature):
    """Say whether the sentence is plausible."""

    sentence: str = dspy.InputField()
    answer: str = dspy.OutputField()


def chat_answer(prompt, params):
    # What a well-behaved model answers to DSPy's ChatAdapter format.
    user = prompt[-1]["content"]
    label = "implausible" if "touchdown" in user else "plausible"
    return f"[[ ## answer ## ]]\n{label}\n\n[[ ## completed ## ]]"


def test_predict_returns_scripted_answer_counted_and_cached(tmp_path):
    backend = ScriptedBackend(chat_answer, "judge")
    lm, cached = open_dspy_lm("scripted:judge", tmp_path / "cache.sqlite", backend=backend, max_tokens=32)
    predict = dspy.Predict(Judge)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        assert predict(sentence="Messi scored a touchdown.").answer == "implausible"
        assert predict(sentence="Messi scored a penalty kick.").answer == "plausible"
        assert cached.calls == 2 and backend.calls == 2
        # A repeat is served by Stillroom's cache: no backend call.
        assert predict(sentence="Messi scored a touchdown.").answer == "implausible"
        assert cached.calls == 2 and backend.calls == 2
    assert cached.meter.summary()["cache_hits"] == 1
    # DSPy's history sees the OpenAI-shaped response; a cache hit bills nothing.
    assert lm.history[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert lm.history[0]["usage"]["completion_tokens"] > 0
    # The cache is durable: a fresh adapter on the same file makes no call either.
    backend2 = ScriptedBackend(chat_answer, "judge")
    lm2, cached2 = open_dspy_lm("scripted:judge", tmp_path / "cache.sqlite", backend=backend2, max_tokens=32)
    with dspy.context(lm=lm2, adapter=dspy.ChatAdapter()):
        assert predict(sentence="Messi scored a penalty kick.").answer == "plausible"
    assert backend2.calls == 0 and cached2.calls == 0


def test_forward_response_shape_and_kwargs():
    seen: list[GenerationParams] = []

    def fn(prompt, params):
        seen.append(params)
        return f"sample {params.n_sample}"

    lm = StillroomLM(ScriptedBackend(fn, "s"), max_tokens=20)
    r = lm.forward(prompt="hi", n=3, temperature=0.7, stop="END", rollout_id=5, logprobs=True)
    assert [c.message.content for c in r.choices] == ["sample 0", "sample 1", "sample 2"]
    assert all(c.finish_reason == "stop" and c["message"]["role"] == "assistant" for c in r.choices)
    assert r.model == "scripted:s" and r.usage["total_tokens"] == r.usage["prompt_tokens"] + r.usage["completion_tokens"]
    assert [p.n_sample for p in seen] == [0, 1, 2]
    assert {(p.max_tokens, p.temperature, p.stop, p.seed) for p in seen} == {(20, 0.7, ("END",), 5)}
    assert "logprobs" in lm.ignored_kwargs
    # The public call returns DSPy's list of texts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lm("hi") == ["sample 0"]
    assert lm.cache is False
    # DSPy's optimisers call copies (`lm.copy(rollout_id=..., temperature=...)`): they share the counters.
    before = lm.requests
    lm.copy(rollout_id=7, temperature=1.0).forward(prompt="hi")
    assert lm.requests == before + 1 and seen[-1].seed == 7 and seen[-1].temperature == 1.0
    assert len(lm.usage_log) == 3 + 1 + 1


def test_generation_params_defaults():
    (p,) = generation_params({"max_tokens": None, "temperature": None}, 1)
    assert p == GenerationParams(max_tokens=GenerationParams.max_tokens, temperature=0.0)
    a, b = generation_params({"rollout_id": 1, "seed": 3}, 1), generation_params({"rollout_id": 2, "seed": 3}, 1)
    assert a[0].seed != b[0].seed


def test_bench_pld_vs_dspy_dry_run_end_to_end(tmp_path):
    """bench/pld_vs_dspy.py on scripted models whose replies break DSPy's format (like a small base model's)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pld_vs_dspy.py"
    spec = importlib.util.spec_from_file_location("pld_vs_dspy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    r = bench.main(["--dry-run", "broken", "--extract-sample", "12", "--val", "6", "--test", "8",
                    "--gepa-metric-calls", "12", "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    assert out.exists() and r["examples"] == {"train": 12, "val": 6, "test": 8}
    for key in ("zero_shot", "pld", "dspy_unoptimised", "dspy_miprov2", "dspy_gepa"):
        assert key in r
    # Same test examples for everyone; PLD's rule makes the scripted student right.
    assert r["pld"]["macro_f1"] == 1.0 and r["pld"]["teacher_calls"] > 0
    # The format-breaking student: every DSPy answer is invalid, and MIPROv2 cannot parse its teacher's proposal.
    assert r["dspy_unoptimised"]["invalid_rate"] == 1.0 and r["dspy_unoptimised"]["program_errors"] == 8
    assert r["dspy_miprov2"]["status"] == "failed" and r["dspy_miprov2"]["macro_f1"] is None
    assert r["dspy_miprov2"]["teacher_calls"] > 0 and r["dspy_gepa"]["teacher_calls"] > 0
    assert any("could not parse the student's reply" in n for n in r["notes"])
