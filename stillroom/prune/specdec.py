"""Speculative-decoding check: a pruned model as the draft for its unpruned target.

transformers' assisted generation (`target.generate(..., assistant_model=draft)`, greedy) runs rounds: the draft
proposes up to K tokens, the target scores them in one forward, keeps the longest agreeing prefix and adds one
token of its own. We report

* acceptance rate = accepted draft tokens / drafted tokens;
* mean accepted length = tokens kept per target call = (accepted + 1 per round) / rounds (K+1 at best);
* speed-up = wall time of the target alone / wall time with the draft, same prompts, same greedy outputs.

How the counts are read in transformers 5: `generate` builds a candidate generator per call through the target's
`_get_candidate_generator`. We wrap that method on the target instance and record, per round, the candidate length
the generator returns from `get_candidates` and the `num_matches` the decoding loop passes to
`update_candidate_strategy` (after its own cropping at EOS and `max_length`). A forward hook counting target calls
gives the number of rounds independently and is checked against it.

Fixed K: in transformers 5.23 the candidate generator reads `num_assistant_tokens`, its schedule and
`assistant_confidence_threshold` from the *draft's* `generation_config`, not from the arguments of `generate`,
and the default threshold (0.4) ends a draft early whenever the draft is unsure. So the draft's generation config
is set to `num_assistant_tokens=K`, `num_assistant_tokens_schedule="constant"`, `assistant_confidence_threshold=0`
for the measurement (and restored afterwards), and the same values are passed to `generate` as well.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SpecDecStats:
    """Counts over one or more assisted generations."""

    rounds: int = 0
    """Target verification calls."""
    drafted: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens the target kept."""
    new_tokens: int = 0
    """Tokens generated (accepted + one target token per round, after EOS/length cropping)."""
    target_forward_calls: int = 0
    """Target forwards counted by a hook (equals `rounds`; kept as a cross-check)."""
    per_round: list[tuple[int, int]] = field(default_factory=list)
    """(drafted, accepted) per round."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def add(self, other: SpecDecStats) -> None:
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.new_tokens += other.new_tokens
        self.target_forward_calls += other.target_forward_calls
        self.per_round.extend(other.per_round)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("per_round")
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_accepted_length"] = self.mean_accepted_length
        return d


@contextmanager
def _fixed_k(draft: Any, k: int):
    gc = draft.generation_config
    saved = {a: getattr(gc, a, None) for a in
             ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    gc.num_assistant_tokens = int(k)
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(gc, a, v)


@contextmanager
def _recording(target: Any, stats: SpecDecStats):
    """Wrap the target's candidate-generator factory and count its forwards (see the module docstring)."""
    original = target._get_candidate_generator

    def factory(*args, **kwargs):
        gen = original(*args, **kwargs)
        get_candidates, update = gen.get_candidates, gen.update_candidate_strategy
        pending = {"drafted": 0}

        def get_candidates_rec(input_ids, *a, **kw):
            cand, logits = get_candidates(input_ids, *a, **kw)
            pending["drafted"] = int(cand.shape[1] - input_ids.shape[1])
            return cand, logits

        def update_rec(input_ids, scores, num_matches):
            n = int(num_matches)
            stats.rounds += 1
            stats.drafted += pending["drafted"]
            stats.accepted += n
            stats.per_round.append((pending["drafted"], n))
            return update(input_ids, scores, num_matches)

        gen.get_candidates = get_candidates_rec
        gen.update_candidate_strategy = update_rec
        return gen

    def count(module, args, kwargs):
        stats.target_forward_calls += 1

    target._get_candidate_generator = factory
    hook = target.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        del target._get_candidate_generator  # back to the class method


def _generation_kwargs(tokenizer: Any, max_new_tokens: int) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"do_sample": False, "max_new_tokens": int(max_new_tokens), "pad_token_id": pad}


def assisted_generate(target: Any, draft: Any, input_ids: Any, *, k: int, max_new_tokens: int,
                      tokenizer: Any = None, **gen_kwargs) -> tuple[Any, SpecDecStats]:
    """Greedy assisted generation of one prompt (batch 1) with a fixed K; returns (output ids, stats)."""
    import torch

    stats = SpecDecStats()
    kw = {"do_sample": False, "max_new_tokens": int(max_new_tokens), **gen_kwargs}
    if tokenizer is not None:
        kw = {**_generation_kwargs(tokenizer, max_new_tokens), **gen_kwargs}
    with _fixed_k(draft, k), _recording(target, stats), torch.inference_mode():
        out = target.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=draft,
            num_assistant_tokens=int(k), num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0,
            **kw,
        )
    stats.new_tokens = int(out.shape[1] - input_ids.shape[1])
    return out, stats


def measure_speculative(target: Any, draft: Any, tokenizer: Any, prompts: Sequence[str], *, k: int = 4,
                        max_new_tokens: int = 32, warmup: bool = True, progress: Any = None) -> dict:
    """Acceptance rate, mean accepted length and wall-clock speed-up of `draft` for `target` over `prompts`.

    Each prompt is generated greedily by the target alone and with the draft; both are timed, and the share of
    prompts where the two outputs are identical is reported (greedy assisted decoding should reproduce the target,
    up to floating-point ties).
    """
    import torch

    target.eval()
    draft.eval()
    device = next(target.parameters()).device
    enc = [torch.tensor([tokenizer(p)["input_ids"]], device=device) for p in prompts]
    kw = _generation_kwargs(tokenizer, max_new_tokens)
    if warmup and enc:
        with torch.inference_mode():
            target.generate(input_ids=enc[0], attention_mask=torch.ones_like(enc[0]), **{**kw, "max_new_tokens": 2})
        assisted_generate(target, draft, enc[0], k=k, max_new_tokens=2, tokenizer=tokenizer)
    total = SpecDecStats()
    t_target = t_assisted = 0.0
    same = 0
    plain_tokens = 0
    for i, ids in enumerate(enc):
        t0 = time.perf_counter()
        with torch.inference_mode():
            plain = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        t_target += time.perf_counter() - t0
        plain_tokens += int(plain.shape[1] - ids.shape[1])
        t0 = time.perf_counter()
        out, st = assisted_generate(target, draft, ids, k=k, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
        t_assisted += time.perf_counter() - t0
        total.add(st)
        same += int(out.shape == plain.shape and bool((out == plain).all()))
        if progress is not None:
            progress(i + 1, len(enc))
    return {
        "k": int(k),
        "prompts": len(enc),
        "max_new_tokens": int(max_new_tokens),
        **total.summary(),
        "target_alone_s": t_target,
        "assisted_s": t_assisted,
        "speedup": t_target / t_assisted if t_assisted > 0 else 0.0,
        "target_alone_tokens": plain_tokens,
        "identical_outputs": same / len(enc) if enc else 0.0,
    }


def load_prompts(spec: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Prompts from a `.txt` file (one per line), a `.jsonl` file (`prompt`, `text` or `input`), or a task spec
    (the evaluator's prompts for the test split). A deterministic sample of at most `limit`."""
    import json
    import random
    from pathlib import Path

    from stillroom.errors import ConfigError

    path = Path(spec).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.exists():
            raise ConfigError(f"{path}: prompts file does not exist")
        prompts = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    elif path.suffix.lower() in (".jsonl", ".ndjson") and path.exists() and _is_prompt_jsonl(path):
        prompts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                prompts.append(str(row.get("prompt", row.get("text", row.get("input", "")))))
    else:
        from stillroom.tasks.load import load_texts_task
        from stillroom.tasks.prompts import render_prompt

        task = load_texts_task(spec)
        prompts = [render_prompt(task, ex) for ex in task.splits(seed=seed).test]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError(f"{spec}: no prompts found")
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


def _is_prompt_jsonl(path) -> bool:
    import json

    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            return isinstance(row, dict) and any(k in row for k in ("prompt", "text"))
    return False
