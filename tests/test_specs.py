"""Model specs: each kind resolves to the right backend or folder, and a bad spec fails with one clear error."""

from __future__ import annotations

import pytest

from stillroom.backends import load_backend
from stillroom.config import BackendConfig
from stillroom.errors import ConfigError
from stillroom.models import is_white_box, resolve_model_path


def test_gguf_spec_loads_the_file_through_transformers(tmp_path, monkeypatch):
    import stillroom.backends.hf as hf

    seen = {}

    class Recorder:
        def __init__(self, src, **kw):
            seen.update(src=src, **kw)

    monkeypatch.setattr(hf, "HFBackend", Recorder)
    f = tmp_path / "models" / "tiny-q4.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF")
    load_backend(BackendConfig(spec=f"gguf:{f}", engine="transformers"))
    assert seen["src"] == str(f.parent) and seen["gguf_file"] == "tiny-q4.gguf"


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothing.gguf"):
        load_backend(f"gguf:{tmp_path / 'nothing.gguf'}")


@pytest.mark.parametrize("spec", ["openai:gpt-4o", "scripted:echo"])
def test_white_box_routes_refuse_models_without_local_weights(spec):
    with pytest.raises(ConfigError, match="local transformers folder"):
        resolve_model_path(spec)


def test_gguf_weights_are_local_weights(tmp_path, monkeypatch):
    """A GGUF file is converted once into a transformers folder in the cache; a missing one is named."""
    import stillroom.backends.embedded as emb

    with pytest.raises(ConfigError, match="no GGUF file at .*missing.gguf"):
        resolve_model_path(f"gguf:{tmp_path / 'missing.gguf'}")
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF")
    calls = []

    def fake_save(model, tok, dest):
        calls.append(dest)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / emb._DONE_MARKER).write_text("ok")
        return dest

    import transformers

    monkeypatch.setattr(emb, "save_model_folder", fake_save)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: object())
    first = resolve_model_path(f"gguf:{f}")
    assert resolve_model_path(f"gguf:{f}") == first and len(calls) == 1  # converted once
    assert first.is_relative_to(tmp_path / "cache")


def test_white_box_and_folder_checks(tmp_path):
    assert is_white_box("gemma3-270m") and is_white_box("hf:x") and not is_white_box("openai:m")
    with pytest.raises(ConfigError, match="config.json missing"):
        resolve_model_path(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(f"hf:{tmp_path}") == tmp_path and resolve_model_path(str(tmp_path)) == tmp_path


def test_unknown_spec_says_what_is_expected():
    with pytest.raises(ConfigError, match="'gguf:FILE'"):
        load_backend("weird:thing")
