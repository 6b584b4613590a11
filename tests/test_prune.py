"""Compression route on tiny random models built in-process: layer surgery (Llama, Gemma-3 sliding/global
pattern), angular distance on a planted identity block, conditional selection, SLERP with mergekit semantics and
the speculative-decoding counts."""

from __future__ import annotations

import copy
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import tiny_gemma as _gemma  # noqa: E402
from conftest import tiny_llama as _llama  # noqa: E402
from conftest import tiny_tokenizer  # noqa: E402

from stillroom.backends.base import GenerationParams  # noqa: E402
from stillroom.backends.scripted import ScriptedBackend  # noqa: E402
from stillroom.prune.angular import analyze_layers, decoder_layers  # noqa: E402
from stillroom.prune.merge import MergeShapeError, layer_t, slerp, slerp_model_folders, slerp_state_dicts  # noqa: E402
from stillroom.prune.selfdistill import run_selfdistill, select_rewrite  # noqa: E402
from stillroom.prune.specdec import assisted_generate, measure_speculative  # noqa: E402
from stillroom.prune.surgery import drop_layers, parse_block, prune_model_folder, save_model  # noqa: E402
from stillroom.tasks.task import Example, Task  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Input: Determine whether the statement is plausible. Answer: plausible",
    "Input: the striker scored a touchdown. Answer: implausible",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Options: red; green; blue. Answer: green",
]


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer trained in-process that prepends <bos>."""
    return tiny_tokenizer(CORPUS, vocab_size=300)


def tiny_llama(tok, layers=6, seed=0, eos=True):
    return _llama(tok, layers=layers, seed=seed, eos=eos).eval()


GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention"]


def tiny_gemma(tok, seed=0):
    return _gemma(tok, layers=6, seed=seed, sliding_window=4, layer_types=GEMMA_TYPES).eval()


def greedy_without_cache(model, ids, n):
    """Greedy decoding by full forwards (no KV cache): the reference cached generation must match."""
    out = ids
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out


def check_reload_and_generate(folder, tok):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = tok("the quick brown fox jumps over the lazy dog the quick", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        cached = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6, pad_token_id=tok.pad_token_id)
    # The cache is addressed by layer_idx: a wrong renumbering breaks cached generation, not full forwards.
    assert torch.equal(cached, greedy_without_cache(m, ids, 6))
    return m


# ------------------------------------------------------------------------------------------------ surgery


def test_parse_block():
    assert parse_block("2:4") == (2, 4)
    from stillroom.errors import ConfigError

    for bad in ("4:2", "x", "3"):
        with pytest.raises(ConfigError):
            parse_block(bad)


def test_drop_layers_llama_removes_exactly_the_block(tok, tmp_path):
    model = tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removed = drop_layers(model, 2, 4)
    assert removed == [2, 3]
    assert model.config.num_hidden_layers == 4 and len(decoder_layers(model)) == 4
    assert model.config.stillroom_removed_layers == [2, 3]
    for new, old in enumerate([0, 1, 4, 5]):
        layer = decoder_layers(model)[new]
        assert layer.self_attn.layer_idx == new
        for name, p in layer.state_dict().items():
            assert torch.equal(p, before[f"model.layers.{old}.{name}"]), (new, old, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[name], before[name])
    out = save_model(model, tok, tmp_path / "pruned")
    m = check_reload_and_generate(out, tok)
    assert m.config.num_hidden_layers == 4 and m.config.stillroom_removed_layers == [2, 3]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k

    # Pruning again records original indices: layers now 0,1,4,5 -> drop new 2:3 (original 4).
    assert drop_layers(model, 2, 3) == [4]
    assert model.config.stillroom_removed_layers == [2, 3, 4]
    assert model.config.stillroom_kept_layers == [0, 1, 5]


def test_drop_layers_gemma3_renumbers_layer_types(tok, tmp_path):
    model = tiny_gemma(tok)
    src = save_model(model, tok, tmp_path / "gemma")
    out = prune_model_folder(src, 1, 3, tmp_path / "gemma-pruned")
    kept = [0, 3, 4, 5]
    expected = [GEMMA_TYPES[i] for i in kept]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert cfg["layer_types"] == expected == ["sliding_attention", "sliding_attention", "full_attention",
                                              "sliding_attention"]
    assert cfg["stillroom_removed_layers"] == [1, 2]
    rec = json.loads((out / "stillroom.json").read_text())
    assert rec["removed_layers"] == [1, 2] and rec["num_hidden_layers"] == {"before": 6, "after": 4}
    m = check_reload_and_generate(out, tok)
    for i, layer in enumerate(decoder_layers(m)):
        assert layer.self_attn.layer_idx == i
        assert layer.self_attn.is_sliding == (expected[i] == "sliding_attention")
    # The kept layers carry their original weights.
    orig = model.state_dict()
    for new, old in enumerate(kept):
        assert torch.equal(m.state_dict()[f"model.layers.{new}.self_attn.q_proj.weight"],
                           orig[f"model.layers.{old}.self_attn.q_proj.weight"])


def test_drop_layers_qwen2_recounts_window_layers(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                      max_window_layers=3)
    m = Qwen2ForCausalLM(cfg).eval()
    types = list(m.config.layer_types)
    drop_layers(m, 1, 3)
    assert m.config.layer_types == [types[i] for i in (0, 3, 4, 5)]
    assert m.config.max_window_layers == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        cached = m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(m, ids, 4))


def test_drop_layers_refuses_bad_blocks(tok):
    from stillroom.errors import ConfigError

    model = tiny_llama(tok, layers=3)
    with pytest.raises(ConfigError):
        drop_layers(model, 2, 5)
    with pytest.raises(ConfigError):
        drop_layers(model, 0, 3)


# ------------------------------------------------------------------------------------------------ angular distance


def test_angular_distance_finds_identity_block(tok):
    model = tiny_llama(tok, layers=6, seed=3)
    layers = decoder_layers(model)
    with torch.no_grad():
        for i in (2, 3):  # the residual stream passes layers 2..3 unchanged
            layers[i].self_attn.o_proj.weight.zero_()
            layers[i].mlp.down_proj.weight.zero_()
    texts = [c + f" {i}" for i, c in enumerate(CORPUS * 2)]
    a = analyze_layers(model, tok, texts, batch_size=3)
    assert a.num_layers == 6 and a.samples == len(texts)
    assert sorted(a.angular) == [1, 2, 3, 4, 5, 6]
    assert len(a.angular[2]) == 5 and len(a.angular[6]) == 1
    assert a.best_block(2)[:2] == (2, 4)
    assert a.best_block(2)[2] < 1e-6
    assert a.lowest_influence(2) == [2, 3]
    assert max(a.block_influence[2], a.block_influence[3]) < 1e-6 < min(a.block_influence[i] for i in (0, 1, 4, 5))
    data = a.to_json()
    assert data["best_block"]["2"]["drop"] == "2:4" and "end-exclusive" in data["index_convention"]


def test_prune_cli_analyze_then_apply_best_block(tok, tmp_path):
    import typer
    from typer.testing import CliRunner

    from stillroom.prune.cli import register

    model = tiny_llama(tok, layers=5, seed=4)
    with torch.no_grad():
        for i in (1, 2):
            decoder_layers(model)[i].self_attn.o_proj.weight.zero_()
            decoder_layers(model)[i].mlp.down_proj.weight.zero_()
    src = save_model(model, tok, tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CORPUS))
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["prune", "analyze", "--model", str(src), "--calibration", str(calib),
                                 "--out", str(tmp_path / "an")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "an" / "angular_heatmap.png").stat().st_size > 1000
    r = CliRunner().invoke(app, ["prune", "apply", "--model", str(src), "--block-size", "2",
                                 "--analysis", str(tmp_path / "an" / "angular.json"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "config.json").read_text())["stillroom_removed_layers"] == [1, 2]


# ------------------------------------------------------------------------------------------------ self-data


def _task(kind="classification"):
    if kind == "free_text":
        return Task(name="math", instruction="Add.", kind="free_text", answer_pattern=r"answer\s*:\s*(\S+)",
                    examples=[Example(id="m0", input="2+2", label="4")])
    return Task(name="plaus", instruction="Is it plausible?", kind="classification",
                labels=("plausible", "implausible"),
                examples=[Example(id=f"e{i}", input=f"statement {i}", label="plausible" if i % 2 else "implausible")
                          for i in range(12)])


def test_conditional_selection_rule():
    task = _task()
    ex = Example(id="x", input="The striker scored a touchdown.", label="implausible")
    assert select_rewrite(task, ex, "implausible").keep
    assert select_rewrite(task, ex, "It is implausible: strikers play football, not American football.").keep
    assert select_rewrite(task, ex, "Answer: implausible").keep
    r = select_rewrite(task, ex, "plausible")
    assert not r.keep and r.reason == "wrong_answer: plausible"
    r = select_rewrite(task, ex, "As the reference answer says, implausible.")
    assert not r.keep and r.reason == "meta_phrase: reference answer"
    r = select_rewrite(task, ex, "Here is your response: implausible")
    assert not r.keep and r.reason.startswith("meta_phrase")
    assert select_rewrite(task, ex, "   ").reason == "empty"
    assert select_rewrite(task, ex, "No idea.").reason == "no_answer"
    # Naming both options is ambiguous: no answer.
    assert select_rewrite(task, ex, "implausible or plausible").reason == "no_answer"
    ft = _task("free_text")
    assert select_rewrite(ft, ft.examples[0], "Two plus two. Answer: 4").keep
    assert select_rewrite(ft, ft.examples[0], "Answer: 5").reason == "wrong_answer: 5"


def test_selfdistill_writes_both_versions_and_resumes_from_cache(tmp_path):
    rows = [{"id": f"e{i}", "input": f"statement number {i}", "label": "plausible" if i % 2 else "implausible"}
            for i in range(30)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def teacher(prompt, params: GenerationParams):
        ref = prompt.rsplit("### Reference Answer:\n", 1)[1].split("\n")[0]  # the demonstrations' come first
        n = int(prompt.split("statement number ")[1].split("\n")[0])
        if n % 3 == 0:
            return f"Following the reference answer, {ref}."
        if n % 3 == 1:
            return f"I think it is {ref} because of the statement."
        return "plausible" if ref == "implausible" else "implausible"

    backend = ScriptedBackend(teacher, name="teacher")
    s = run_selfdistill("scripted:teacher", str(data), tmp_path / "run", backend=backend)
    out = [json.loads(x) for x in (tmp_path / "run" / "selfdistill.jsonl").read_text().splitlines()]
    assert s["examples"] == len(out) > 0 and backend.calls == len(out)
    assert s["acceptance"] == pytest.approx(sum(r["kept"] for r in out) / len(out))
    assert 0 < s["acceptance"] < 1 and set(s["reasons"]) <= {"kept", "meta_phrase", "wrong_answer"}
    sft = [json.loads(x) for x in (tmp_path / "run" / "sft_self_data.jsonl").read_text().splitlines()]
    orig = [json.loads(x) for x in (tmp_path / "run" / "sft_original.jsonl").read_text().splitlines()]
    for r, a, b in zip(out, sft, orig, strict=True):
        assert b["completion"] == " " + r["label"]
        # A kept rewrite heals as the label (the scored continuation) followed by the rewrite's words.
        assert a["completion"] == (f" {r['label']}\n{r['rewrite'].strip()}" if r["kept"] else r["original"])
        assert a["prompt"] == b["prompt"] and a["prompt"].endswith("Answer:")
    backend2 = ScriptedBackend(teacher, name="teacher")
    s2 = run_selfdistill("scripted:teacher", str(data), tmp_path / "run", backend=backend2)
    assert backend2.calls == 0 and s2["backend_calls"] == 0 and s2["kept"] == s["kept"]


# ------------------------------------------------------------------------------------------------ SLERP


def direct_slerp(t, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    th = math.acos(cos)
    return ((math.sin((1 - t) * th) * a64 + math.sin(t * th) * b64) / math.sin(th)).reshape(a.shape)


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid.double(), direct_slerp(0.5, a, b), atol=1e-5)
    # Interpolation on the sphere keeps the norm between the endpoints' for same-norm tensors.
    c = b / b.norm() * a.norm()
    assert slerp(0.5, a, c).norm() == pytest.approx(float(a.norm()), rel=1e-5)
    # Parallel and anti-parallel tensors: linear interpolation.
    assert torch.allclose(slerp(0.25, a, 3 * a), 0.75 * a + 0.25 * 3 * a, atol=1e-6)
    assert torch.allclose(slerp(0.5, a, -a), torch.zeros_like(a), atol=1e-6)
    near = a + 1e-4 * torch.randn(8, 5, generator=g)
    assert torch.allclose(slerp(0.3, a, near), 0.7 * a + 0.3 * near, atol=1e-6)
    assert slerp(0.5, a.half(), b.half()).dtype == torch.float16


def test_slerp_schedule_and_shape_errors():
    assert layer_t([0.0, 1.0], "model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_t([0.0, 1.0], "model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_t([0.0, 0.5, 1.0], "model.layers.1.mlp.up_proj.weight", 5) == pytest.approx(0.25)
    assert layer_t([0.2, 1.0], "model.embed_tokens.weight", 5) == 0.2  # non-layer tensors: schedule start
    assert layer_t(0.7, "lm_head.weight", 5) == 0.7
    sd_a = {"w": torch.ones(2, 3), "model.layers.0.x": torch.ones(4)}
    with pytest.raises(MergeShapeError, match=r"'w'.*\(2, 3\).*\(3, 2\)"):
        slerp_state_dicts(sd_a, {"w": torch.ones(3, 2), "model.layers.0.x": torch.ones(4)}, 0.5, 1)
    with pytest.raises(MergeShapeError, match="only in model A"):
        slerp_state_dicts(sd_a, {"w": torch.ones(2, 3)}, 0.5, 1)


def test_slerp_model_folders(tok, tmp_path):
    a, b = tiny_llama(tok, layers=2, seed=1), tiny_llama(tok, layers=2, seed=2)
    pa, pb = save_model(a, tok, tmp_path / "a"), save_model(b, tok, tmp_path / "b")
    out0 = slerp_model_folders(pa, pb, tmp_path / "m0", t=0.0)
    m0 = check_reload_and_generate(out0, tok)
    for k, v in a.state_dict().items():
        assert torch.equal(m0.state_dict()[k], v), k
    out = slerp_model_folders(pa, pb, tmp_path / "m", t=[0.0, 1.0])
    m = check_reload_and_generate(out, tok)
    sd = m.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], a.state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(sd["model.layers.1.mlp.up_proj.weight"], b.state_dict()["model.layers.1.mlp.up_proj.weight"],
                          atol=1e-6)
    deeper = tiny_llama(tok, layers=3)
    pc = save_model(deeper, tok, tmp_path / "c")
    with pytest.raises(MergeShapeError, match="same depth"):
        slerp_model_folders(pa, pc, tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ speculative decoding


@pytest.mark.parametrize("k", [2, 4])
def test_identical_draft_accepts_everything(tok, k):
    target = tiny_llama(tok, layers=2, seed=5, eos=False)
    draft = copy.deepcopy(target)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
    out, st = assisted_generate(target, draft, ids, k=k, max_new_tokens=3 * (k + 1), tokenizer=tok)
    assert st.new_tokens == 3 * (k + 1) == out.shape[1] - ids.shape[1]
    assert st.rounds == 3 == st.target_forward_calls
    assert st.drafted == 3 * k and st.acceptance_rate == 1.0
    assert st.mean_accepted_length == k + 1
    # The draft's generation config is restored afterwards.
    assert draft.generation_config.num_assistant_tokens != k or k == 20


def test_pruned_draft_counts_are_consistent(tok):
    target = tiny_llama(tok, layers=4, seed=6, eos=False)
    draft = copy.deepcopy(target)
    drop_layers(draft, 1, 3)
    prompts = ["the quick brown fox", "The capital of France is"]
    res = measure_speculative(target, draft, tok, prompts, k=3, max_new_tokens=10)
    assert res["rounds"] == res["target_forward_calls"] > 0
    assert res["new_tokens"] == res["accepted"] + res["rounds"] == res["target_alone_tokens"]
    assert 0 <= res["acceptance_rate"] <= 1 and 1 <= res["mean_accepted_length"] <= 4
    assert res["identical_outputs"] == 1.0  # greedy assisted decoding reproduces the target
    assert res["speedup"] == pytest.approx(res["target_alone_s"] / res["assisted_s"])
    assert 0 < res["drafted"] <= res["rounds"] * 3  # never more than K draft tokens per round


def test_cli_merge_specdec_heal(tok, tmp_path):
    import typer
    from typer.testing import CliRunner

    from stillroom.prune.cli import register

    app = typer.Typer()
    register(app)
    run = CliRunner().invoke
    pa = save_model(tiny_llama(tok, layers=2, seed=1, eos=False), tok, tmp_path / "a")
    pb = save_model(tiny_llama(tok, layers=2, seed=2, eos=False), tok, tmp_path / "b")
    r = run(app, ["merge", "slerp", str(pa), str(pb), "--t-schedule", "0,1", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "stillroom.json").read_text())["t"] == [0.0, 1.0]
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\nThe capital of France is\n")
    r = run(app, ["specdec", "--target", str(pa), "--draft", str(pa), "--prompts", str(prompts), "--k", "3",
                  "--max-new-tokens", "8", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s" / "specdec.json").read_text())
    assert res["acceptance_rate"] == 1.0 and res["mean_accepted_length"] == 4.0
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Input: fox {i}\nAnswer:", "completion": " plausible"}) + "\n"
                            for i in range(4)))
    r = run(app, ["heal", "--model", str(pa), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                  "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    healed = json.loads((tmp_path / "h" / "stillroom.json").read_text())
    assert healed["steps"] == 2 and len(healed["losses"]) == 2 and (tmp_path / "h" / "config.yaml").exists()
    # LoRA (q_proj, v_proj) folded in: exactly those weights changed, every one of them.
    from safetensors.torch import load_file

    before, after = load_file(str(pa / "model.safetensors")), load_file(str(tmp_path / "h" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == targets and len(targets) == 4
    r = run(app, ["merge", "slerp", str(pa), str(save_model(tiny_llama(tok, layers=3), tok, tmp_path / "c")),
                  "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "same depth" in r.output
