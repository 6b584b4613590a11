"""Bridges from Stillroom to other toolkits.

`stillroom.integrations.dspy_lm.StillroomLM` lets DSPy (a bench-only dependency, installed with the `bench`
extra) run on any Stillroom backend. It is imported lazily, so `import stillroom.integrations` works without
DSPy installed.
"""

from __future__ import annotations

__all__ = ["StillroomLM", "open_dspy_lm"]


def __getattr__(name: str):
    if name in __all__:
        from stillroom.integrations import dspy_lm

        return getattr(dspy_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
