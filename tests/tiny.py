"""Compatibility name for the fast suite's builders, which live in `conftest.py`."""

from conftest import one_thread, tiny_gemma, tiny_llama, tiny_tokenizer  # noqa: F401
