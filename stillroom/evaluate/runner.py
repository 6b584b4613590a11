"""Run a model over a split: log-likelihood scoring where the backend can, generation + tolerant parsing
where it cannot. Produces per-example predictions and the metrics of `stillroom.evaluate.metrics`."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from stillroom.backends.base import Backend, GenerationParams, ScoreRequest
from stillroom.errors import ConfigError
from stillroom.evaluate.metrics import classification_metrics, cost_metrics
from stillroom.tasks.prompts import continuation, render_chat, render_prompt
from stillroom.tasks.task import Example, Task
from stillroom.ui import progress_bar

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class EvalResult:
    """Per-example predictions (dicts, ready for predictions.jsonl) and the aggregate metrics."""

    predictions: list[dict]
    metrics: dict
    method: str
    extra: dict = field(default_factory=dict)


def _norm(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def parse_choice(text: str, options: Sequence[str]) -> str | None:
    """Map a generated answer to one option, tolerantly; None when it names none or several.

    Accepts: the option itself (any case/punctuation), text after the last 'Answer:', an option letter
    ('B', '(b)'), or the only option mentioned. Two different options mentioned is ambiguous: invalid.
    """
    t = text.strip()
    low = t.lower()
    if "answer:" in low:
        t = t[low.rfind("answer:") + len("answer:") :].strip()
    nt = _norm(t)
    if not nt:
        return None
    normed = {o: _norm(o) for o in options}
    for o, no in normed.items():
        if nt == no:
            return o
    m = re.fullmatch(r"\(?([a-z])\)?", nt)
    if m and LETTERS.find(m.group(1).upper()) < len(options):
        return options[LETTERS.index(m.group(1).upper())]
    # Whole-word mentions; a mention inside a longer one ("plausible" in "not plausible") does not count.
    spans = [(mm.start(), mm.end(), o) for o, no in normed.items() if no
             for mm in re.finditer(r"\b" + re.escape(no) + r"\b", nt)]
    kept = {o for (a, b, o) in spans if not any((a2 <= a and b <= b2) and (b2 - a2) > (b - a) for (a2, b2, _) in spans)}
    return kept.pop() if len(kept) == 1 else None


def metric_labels(task: Task, ex: Example, option: str | None) -> str | None:
    """The label metrics are computed over: the option itself, or its letter for per-example choices."""
    if option is None:
        return None
    if task.kind == "multiple_choice":
        return LETTERS[task.options(ex).index(option)]
    return option


def evaluate(
    task: Task,
    examples: Sequence[Example],
    backend: Backend,
    *,
    shots: Sequence[Example] = (),
    system_prompt: str | None = None,
    method: str = "auto",
    max_new_tokens: int = 16,
    cot_max_tokens: int = 256,
    chunk_size: int = 8,
    description: str = "eval",
    timed: bool = True,
) -> EvalResult:
    """Evaluate `backend` on `examples`.

    method: 'loglik' (argmax log-likelihood over the options, identical to lm-evaluation-harness's
    multiple-choice `acc`), 'generate' (answer only, parsed, at most `max_new_tokens`), 'cot' (reason, then
    'Answer: ...', at most `cot_max_tokens` in all), or 'auto' (loglik where the backend can score and the task
    has options, else generate).

    `timed`: latency per answer is measured as `stillroom.evaluate.latency` says (the same way for every
    condition and route, and named in `metrics['latency_method']`); loops that only need quality (PLD's
    validation passes) turn it off.
    """
    extra: dict = {}
    # A served model's refusal says why it cannot score (e.g. llama.cpp's server ignores echo) and what to do.
    # Asked only when scoring is in question: a served model's capability costs a probe request.
    refusal = None
    if method in ("auto", "loglik") and task.kind != "free_text" and not backend.supports_score:
        refusal = getattr(getattr(backend, "backend", backend), "score_refusal", None)
    if method == "auto":
        method = "loglik" if task.kind != "free_text" and backend.supports_score else "generate"
        if refusal:
            extra["notes"] = [f"scored by generation, not log-likelihood: {refusal}"]
    if method == "loglik" and not backend.supports_score:
        raise ConfigError(refusal or f"{backend.identity} cannot score log-likelihoods; use method 'generate'")
    if method == "loglik" and task.kind == "free_text":
        raise ValueError("log-likelihood scoring needs answer options; free-text tasks use 'generate'")
    # A backend that builds what a method needs on first use (the llama.cpp engine: its transformers model for
    # scoring, its server for generation) builds it now, so that is not counted as the first answers' latency.
    prepare = getattr(getattr(backend, "backend", backend), "prepare", None)
    if callable(prepare) and examples:
        prepare("score" if method == "loglik" else "generate")
    preds: list[dict] = []
    with progress_bar() as bar:
        job = bar.add_task(f"{description} ({method})", total=len(examples))
        for start in range(0, len(examples), chunk_size):
            chunk = list(examples[start : start + chunk_size])
            if method == "loglik":
                preds.extend(_score_chunk(task, chunk, backend, shots, system_prompt))
            else:
                budget = cot_max_tokens if method == "cot" else max_new_tokens
                preds.extend(_generate_chunk(task, chunk, backend, shots, system_prompt, method, budget))
            bar.advance(job, len(chunk))
    metrics = summarise(task, examples, preds)
    if timed:
        from stillroom.evaluate.latency import latency_method, measure_latency

        budget = cot_max_tokens if method == "cot" else max_new_tokens
        lat = measure_latency(task, examples, backend, shots=shots, system_prompt=system_prompt, method=method,
                              max_tokens=budget)
        if lat is not None:
            metrics.update(latency_p50_s=lat["p50_s"], latency_p95_s=lat["p95_s"], latency_method=lat["method"])
        else:
            metrics["latency_method"] = latency_method(backend)
    return EvalResult(predictions=preds, metrics=metrics, method=method, extra=extra)


def _score_chunk(task, chunk, backend, shots, system_prompt) -> list[dict]:
    requests = [
        ScoreRequest(render_prompt(task, ex, shots, system_prompt), tuple(continuation(o) for o in task.options(ex)))
        for ex in chunk
    ]
    t0 = time.perf_counter()
    scores = backend.score(requests)
    # Requests are scored together (shared prefixes), so per-example latency is the chunk's share. A cached
    # backend reports the share measured when each request was really scored (cache hits included).
    per_ex = (time.perf_counter() - t0) / max(1, len(chunk))
    lats = getattr(backend, "last_score_latencies", None)
    if not isinstance(lats, list) or len(lats) != len(chunk):
        lats = [per_ex] * len(chunk)
    out = []
    for ex, req, sc, latency in zip(chunk, requests, scores, lats, strict=True):
        opts = task.options(ex)
        best = max(range(len(opts)), key=lambda i: sc[i])
        pred = opts[best]
        out.append(
            _record(task, ex, pred, raw={"loglik": [float(x) for x in sc]}, latency=latency,
                    tokens_in=backend.count_tokens(req.context), tokens_out=0, cached=False)
        )
    return out


def _generate_chunk(task, chunk, backend, shots, system_prompt, method, max_new_tokens) -> list[dict]:
    reason = method == "cot"
    prompts = [render_chat(task, ex, shots, system_prompt, reason=reason) for ex in chunk]
    params = GenerationParams(max_tokens=max_new_tokens, temperature=0.0)
    gens = backend.generate_many(prompts, params)
    out = []
    for ex, g in zip(chunk, gens, strict=True):
        if task.kind == "free_text":
            pred = task.extract_answer(g.text) or None
        else:
            pred = parse_choice(g.text, task.options(ex))
        out.append(
            _record(task, ex, pred, raw={"text": g.text}, latency=g.usage.latency_s,
                    tokens_in=g.usage.input_tokens, tokens_out=g.usage.output_tokens, cached=g.usage.cached)
        )
    return out


def _record(task, ex, pred, *, raw, latency, tokens_in, tokens_out, cached) -> dict:
    if task.kind == "free_text":
        correct = pred is not None and _norm(pred) == _norm(str(ex.label))
    else:
        correct = pred == ex.label
    return {
        "id": ex.id,
        "input": ex.input,
        "gold": ex.label,
        "pred": pred,
        "correct": bool(correct),
        "input_tokens": int(tokens_in),
        "output_tokens": int(tokens_out),
        "latency_s": float(latency),
        "cached": bool(cached),
        **raw,
    }


def summarise(task: Task, examples: Sequence[Example], preds: Sequence[dict]) -> dict:
    """Quality and cost metrics from prediction records."""
    by_id = {ex.id: ex for ex in examples}
    if task.kind == "free_text":
        n = len(preds)
        gold = any(p["gold"] is not None for p in preds)
        quality = {
            "n": n,
            # Without gold answers there is nothing to be right about: no accuracy is claimed (None, shown '-').
            "accuracy": (sum(p["correct"] for p in preds) / n if n else 0.0) if gold else None,
            "macro_f1": None,
            "invalid_rate": sum(p["pred"] is None for p in preds) / n if n else 0.0,
            "gold_labels": gold,
        }
    else:
        gold = [metric_labels(task, by_id[p["id"]], p["gold"]) for p in preds]
        pred = [metric_labels(task, by_id[p["id"]], p["pred"]) for p in preds]
        if task.kind == "multiple_choice":
            labels = list(LETTERS[: max(len(task.options(ex)) for ex in examples)])
        else:
            labels = list(task.labels or [])
        quality = classification_metrics(gold, pred, labels)
    cost = cost_metrics(
        [p["input_tokens"] for p in preds],
        [p["output_tokens"] for p in preds],
        [p["latency_s"] for p in preds if not p["cached"]] or [p["latency_s"] for p in preds],
    )
    return {**quality, **cost}


def evaluate_model(task, examples, model, tokenizer, *, shots=(), name: str = "student") -> EvalResult:
    """Evaluate an in-memory transformers model with the shared evaluator (log-likelihood over the options where
    possible): for benches and notebooks; the routes deploy their models through `stillroom.route`."""
    from stillroom.backends.hf import HFBackend

    backend = HFBackend.from_objects(model, tokenizer, name=name)
    return evaluate(task, examples, backend, shots=shots, description=name)
