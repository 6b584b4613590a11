"""Backends: one interface (`Backend`) for every model, plus the durable cache around it."""

from __future__ import annotations

from pathlib import Path

from stillroom.backends.base import (
    Backend,
    BackendBase,
    Generation,
    GenerationParams,
    Prompt,
    ScoreRequest,
    Usage,
)
from stillroom.config import BackendConfig, SpendConfig
from stillroom.errors import ConfigError

__all__ = [
    "Backend",
    "BackendBase",
    "Generation",
    "GenerationParams",
    "Prompt",
    "ScoreRequest",
    "Usage",
    "load_backend",
    "open_cached_backend",
    "SCRIPTS",
]

# Named scripts for `scripted:NAME` specs (tests and dry runs register their own).
SCRIPTS: dict = {}


def load_backend(cfg: BackendConfig | str) -> Backend:
    """Build the backend a spec names. Heavy libraries are imported only for the backend in use."""
    if isinstance(cfg, str):
        cfg = BackendConfig(spec=cfg)
    spec = cfg.spec
    kind, _, rest = spec.partition(":")
    from stillroom.backends.embedded import EMBEDDED
    from stillroom.backends.llamacpp import resolve_engine

    if resolve_engine(cfg.engine, spec, cfg.device) == "llamacpp":
        from stillroom.backends.llamacpp import engine_backend

        return engine_backend(spec, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                              slot_ctx=cfg.max_input_tokens)
    if spec in EMBEDDED:
        from stillroom.backends.embedded import ensure_embedded
        from stillroom.backends.hf import HFBackend

        return _local(HFBackend(str(ensure_embedded(spec)), device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size))
    if kind == "hf" and rest:
        from stillroom.backends.hf import HFBackend

        check_local_path(spec, rest)
        return _local(HFBackend(rest, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size))
    if kind == "gguf" and rest:
        from stillroom.backends.hf import HFBackend

        path = Path(rest).expanduser()
        if not path.exists():
            raise ConfigError(f"GGUF file {path} does not exist")
        return _local(HFBackend(str(path.parent), gguf_file=path.name, device=cfg.device, dtype=cfg.dtype,
                                batch_size=cfg.batch_size))
    if kind == "openai" and rest:
        from stillroom.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(
            rest,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            retry_budget_s=cfg.retry_budget_s,
            max_input_tokens=cfg.max_input_tokens,
            tokenizer=cfg.tokenizer,
            max_tokens_param=cfg.max_tokens_param,
        )
    if kind == "scripted" and rest:
        from stillroom.backends.scripted import ScriptedBackend, echo_last_line

        scripts = {"echo": echo_last_line, **SCRIPTS}
        if rest not in scripts:
            raise ConfigError(f"unknown scripted backend {rest!r}; known: {', '.join(sorted(scripts))}")
        return ScriptedBackend(scripts[rest], name=rest)
    raise ConfigError(
        f"model spec {spec!r} not understood: expected 'gemma3-270m', 'qwen2.5-coder-0.5b', 'hf:PATH', 'gguf:FILE', 'openai:MODEL' "
        "or 'scripted:NAME'"
    )


def looks_like_path(name: str) -> bool:
    """Whether an 'hf:' name is meant as a folder (./x, ../x, /x, ~/x, a Windows drive, or a/b/c), not a hub name
    like 'org/model'."""
    return (name.startswith((".", "/", "~", "\\")) or (len(name) > 1 and name[1] == ":")
            or name.count("/") > 1 or "\\" in name)


def check_local_path(spec: str, name: str) -> None:
    """A spec naming a folder that does not exist is refused as such (before transformers reads it as a hub
    repo id and answers with its naming rules)."""
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise ConfigError(f"{spec!r}: no such folder {name} (resolved: {path.resolve()}); expected a local "
                          "transformers model folder, or a hub name like 'org/model' already in the local Hugging "
                          "Face cache")


def _local(backend):
    # A local model counts tokens with its own tokenizer, so its counts bound what a prompt really costs.
    backend.exact_tokens = True
    return backend


def open_cached_backend(cfg: BackendConfig, cache_path: Path, spend: SpendConfig | None = None, backend: Backend | None = None):
    """The backend wrapped in the run's durable SQLite cache and usage meter (with the spend cap).

    Every route goes through this, so a completed call is never paid for twice.
    """
    from stillroom.backends.cache import CachedBackend, ResponseCache
    from stillroom.backends.usage import Prices, SpendCap, UsageMeter, active_ledger

    backend = backend or load_backend(cfg)
    cache = ResponseCache(cache_path)
    prices = {backend.model: Prices(input_per_mtok=cfg.price_in_per_mtok, output_per_mtok=cfg.price_out_per_mtok)}
    cap = SpendCap(max_tokens=spend.max_tokens, max_cost_usd=spend.max_cost_usd) if spend else None
    prior = cache.total_usage(identity=backend.identity)
    ledger = active_ledger()
    if ledger is not None and (spend is not None or getattr(backend, "max_concurrency", None) is not None):
        # Inside a command with one ledger (`stillroom compare`): the command's cap covers this backend, with
        # every other route's spend, instead of this folder's own. What counts is what a single route caps
        # (the meters opened with a spend config: teachers, evaluated models) plus any API model (PLD's student).
        meter = UsageMeter(prices=prices, prior=prior, ledger=ledger,
                           ledger_key=(Path(cache_path).parent.name, backend.identity), cache_path=cache_path)
    else:
        # The cap covers this backend's spend in the run folder, earlier invocations included (not the other
        # models sharing the cache file, e.g. a local student next to a paid teacher).
        meter = UsageMeter(prices=prices, cap=cap, prior=prior)
    return CachedBackend(backend, cache, meter)
