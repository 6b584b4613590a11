"""Tiny in-process building blocks shared by the fast tests (no downloads)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest


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
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (no intra-op hand-offs); restored after the module.
    Import it into a test module to apply it there."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
