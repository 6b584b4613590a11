"""The shared SFT helper on tiny random models: the completion-only head loss equals the model's own loss on
answer tokens, prompt tokens are masked, LoRA healing lowers the loss and changes every trainable parameter,
full fine-tuning works, and `heal` saves a plain model folder."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from conftest import tiny_gemma as _gemma  # noqa: E402
from conftest import tiny_llama as _llama  # noqa: E402
from conftest import tiny_tokenizer  # noqa: E402

from stillroom.train.sft import (  # noqa: E402
    SFTSettings,
    _head_transform,
    build_trainer,
    completion_head_loss,
    heal,
    train_sft,
)

CORPUS = [
    "Input: Determine whether the statement is plausible. Answer: plausible",
    "Input: the striker scored a touchdown. Answer: implausible",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer trained in-process that prepends <bos>."""
    return tiny_tokenizer(CORPUS, vocab_size=280)


def tiny_llama(tok, seed=0):
    return _llama(tok, seed=seed, init=0.02)


def tiny_gemma(tok, seed=0):
    return _gemma(tok, seed=seed, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                  final_logit_softcapping=5.0, init=0.5)


def records(n=32):
    out = []
    for i in range(n):
        label = "plausible" if i % 2 else "implausible"
        out.append({"prompt": f"Input: the fox number {i} jumps over the lazy dog.\nAnswer:", "completion": " " + label})
    return out


def completion_loss(model, tok, recs):
    """Mean loss over completion tokens, computed the plain way (full logits, prompt masked)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in recs:
            p = tok(r["prompt"])["input_ids"]
            full = tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]
            labels = torch.tensor([[-100] * len(p) + full[len(p):]])
            out = model(input_ids=torch.tensor([full]), labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * k
            n += k
    return total / n


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_completion_head_loss_matches_full_logits_loss(tok, family):
    model = (tiny_llama if family == "llama" else tiny_gemma)(tok)
    ids = torch.randint(4, len(tok), (3, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # prompt
    labels[2, 10:] = -100  # padding
    ref = model(input_ids=ids, labels=labels).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    transform = _head_transform(model.config)
    loss_sum, n, _ = completion_head_loss(hidden, labels, model.get_output_embeddings(), transform, chunk=1024)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / n, ref, atol=1e-5)
    # Tiled under checkpointing: same value, same gradients.
    g1 = torch.autograd.grad(loss_sum, model.lm_head.weight)[0]
    hidden = model.model(input_ids=ids).last_hidden_state
    loss2, n2, _ = completion_head_loss(hidden, labels, model.get_output_embeddings(), transform, chunk=3)
    g2 = torch.autograd.grad(loss2, model.lm_head.weight)[0]
    assert n2 == n and torch.allclose(loss2, loss_sum, atol=1e-5) and torch.allclose(g1, g2, atol=1e-6)


def test_prompt_tokens_are_masked(tok, tmp_path):
    trainer = build_trainer(tiny_llama(tok), tok, records(4), SFTSettings(max_steps=1), tmp_path / "t")
    row = trainer.train_dataset[0]
    p = tok(records(4)[0]["prompt"])["input_ids"]
    labels = row["labels"]
    assert all(x == -100 for x in labels[: len(p)])
    assert labels[len(p):] == row["input_ids"][len(p):] and len(labels) > len(p)
    assert tok.decode(row["input_ids"][len(p):]).strip().startswith("implausible")


def test_lora_healing_reduces_loss_and_changes_every_trainable_parameter(tok, tmp_path):
    model = tiny_llama(tok)
    data = records()
    before = completion_loss(model, tok, data)
    settings = SFTSettings(max_steps=12, learning_rate=3e-2, batch_size=8, lora_dropout=0.0, logging_steps=4)
    trainer = build_trainer(model, tok, data, settings, tmp_path / "t")
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and losses[-1] < losses[0]
    for n, p in trainer.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p.detach(), trainable[n]), f"{n} did not change"
        else:
            assert torch.equal(p.detach(), base[n]), f"frozen {n} changed"
    merged = trainer.model.merge_and_unload()
    if "forward" in vars(merged):
        del merged.forward
    assert completion_loss(merged, tok, data) < before - 0.1


def test_full_finetune_and_heal_saves_plain_model(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from stillroom.prune.surgery import save_model

    src = save_model(tiny_gemma(tok), tok, tmp_path / "src")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(16)))
    before = completion_loss(AutoModelForCausalLM.from_pretrained(str(src)), tok, records(16))
    rec = heal(src, data, tmp_path / "healed", SFTSettings(lora=False, max_steps=5, learning_rate=5e-3, batch_size=8))
    assert rec["steps"] == 5 and rec["trainable_parameters"] > 0
    healed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "healed"))
    assert not any("lora" in k for k in healed.state_dict())
    assert completion_loss(healed, tok, records(16)) < before
    saved = json.loads((tmp_path / "healed" / "stillroom.json").read_text())
    assert saved["settings"]["lora"] is False and len(saved["losses"]) == 5


def test_train_sft_returns_merged_unpatched_model(tok, tmp_path):
    res = train_sft(tiny_llama(tok), tok, records(8), SFTSettings(max_steps=2, batch_size=4), tmp_path / "t")
    assert res.steps == 2 and len(res.losses) == 2
    assert "forward" not in vars(res.model) and not hasattr(res.model, "peft_config")
    ids = tok("Input: the fox", return_tensors="pt")["input_ids"]
    assert res.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] >= ids.shape[1] + 1
