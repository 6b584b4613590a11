"""The fast suite's building blocks, in one place: a tiny BPE tokenizer trained in-process, tiny random Gemma-3
and Llama models built from a config, and a fixture that runs tiny models on one thread. No downloads."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from conftest import ...` / `import helpers_*`


def tiny_tokenizer(corpus: Sequence[str], vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained in-process on `corpus`, prepending <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(list(corpus) * 20, trainer)
    bos = t.token_to_id("<bos>")
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                     special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma(tok, *, layers: int = 2, hidden: int = 16, seed: int = 0, layer_types: Sequence[str] | None = None,
               sliding_window: int = 512, init: float = 0.3, vocab: int | None = None, max_positions: int = 256,
               **extra):
    """A random Gemma-3 text model (head_dim 8, 2 heads, 1 KV head), all full attention unless `layer_types`."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=max_positions,
        sliding_window=sliding_window, layer_types=list(layer_types or ["full_attention"] * layers),
        initializer_range=init, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **extra,
    )
    return Gemma3ForCausalLM(cfg)


def tiny_llama(tok, *, layers: int = 2, hidden: int = 16, seed: int = 0, init: float = 0.3, eos: bool = True,
               max_positions: int = 256, **extra):
    """A random Llama model (2 heads, 1 KV head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions, initializer_range=init,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id if eos else None, **extra,
    )
    return LlamaForCausalLM(cfg)


def naive_score(model, tok, requests, max_length: int | None = None) -> list[list[float]]:
    """One full forward per (context, continuation); lm-eval HFLM tokenization; summed continuation log-probs."""
    import torch

    max_length = max_length or model.config.max_position_embeddings
    bos = tok.bos_token_id
    out = []
    for r in requests:
        row = []
        for cont in r.continuations:
            ctx = r.context
            if ctx == "":
                cont_enc = tok.encode(cont, add_special_tokens=False)
                ctx_enc, cont_enc = ([bos], cont_enc) if cont_enc[0] != bos else (cont_enc[:1], cont_enc[1:])
            else:
                n = len(ctx) - len(ctx.rstrip())
                if n:
                    cont, ctx = ctx[-n:] + cont, ctx[:-n]
                whole = tok.encode(ctx + cont)
                ctx_enc = tok.encode(ctx)
                cont_enc = whole[len(ctx_enc):]
            inp = (ctx_enc + cont_enc)[-(max_length + 1):][:-1]
            with torch.no_grad():
                logits = model(torch.tensor([inp])).logits[0]
            lp = torch.log_softmax(logits[len(inp) - len(cont_enc):].float(), dim=-1)
            row.append(float(lp.gather(1, torch.tensor(cont_enc)[:, None]).sum()))
        out.append(row)
    return out


def assert_same(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=tol), (g, w)
        assert max(range(len(g)), key=g.__getitem__) == max(range(len(w)), key=w.__getitem__)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (no intra-op hand-offs); restored after the module. Modules of tiny
    models use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_sp_tokenizer(corpus: Sequence[str], vocab_size: int = 200, limit_alphabet: int = 40):
    """A small SentencePiece-style BPE tokenizer (like Gemma's: '▁' for spaces, ``<0xNN>`` byte-fallback tokens for
    every byte) trained in-process on `corpus`; a small alphabet makes rarer characters (CJK, emoji) fall back to
    bytes. Genuinely different from `tiny_tokenizer` (ByteLevel BPE), for cross-tokenizer tests."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    t.train_from_iterator(list(corpus) * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                 limit_alphabet=limit_alphabet))
    # Rebuilt with the 256 byte pieces as ordinary vocabulary entries (as in Gemma's vocabulary), byte fallback on.
    model = json.loads(t.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    sp.add_special_tokens(specials)
    sp.normalizer, sp.pre_tokenizer = t.normalizer, t.pre_tokenizer
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = sp.token_to_id("<bos>")
    sp.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
