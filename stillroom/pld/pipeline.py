"""`stillroom pld`: the four phases into one run folder, then the comparison on the test split.

Resuming is replaying: every teacher and student completion lives in the run's durable cache, every step is
deterministic given those completions (seeded samples, deterministic embeddings and DBSCAN), so rerunning the
same command after a crash, a kill or a spend-cap stop makes no repeated teacher call and rebuilds the same
rulebook, then carries on where the run stopped.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from stillroom.backends import load_backend, open_cached_backend
from stillroom.backends.base import GenerationParams
from stillroom.config import PLDConfig
from stillroom.evaluate.runner import EvalResult
from stillroom.pld.cluster import Embedder, cluster_instructions, coverage_report, load_embedder
from stillroom.pld.extract import drop_counts, extract_instructions, kept_truncated, retried
from stillroom.pld.prompts import completes_raw_text, teacher_stops, wants_worked_example
from stillroom.pld.report import pld_report
from stillroom.pld.resolve import Resolution, resolve_conflicts
from stillroom.pld.rulebook import Rulebook
from stillroom.pld.synthesize import synthesize_rules
from stillroom.route import Built, Deployment, RouteContext, run_route
from stillroom.tasks.task import Task


def run_pld(cfg: PLDConfig, run_dir: Path, *, teacher=None, student=None, embedder: Embedder | None = None,
            task: Task | None = None, wait: bool | None = None) -> dict:
    """Run PLD end to end through the route skeleton; returns the metrics written to metrics.json.

    Task, model specs and every example's fit are checked before the run folder is created; the folder is
    held (`stillroom.locking`) while it is written; `wait` queues behind a process that holds it.
    """

    def prepare(cfg: PLDConfig, sel):
        t = teacher or load_backend(cfg.teacher)
        s = student or (t if cfg.student == cfg.teacher else load_backend(cfg.student))
        return t, s, fit_pld_examples(cfg, sel, t, s)

    return run_route(cfg, run_dir, lambda ctx: build_pld(ctx, embedder), route="pld", prepare=prepare, task=task,
                     need_labels=True, wait=wait, title=lambda ctx: f"Stillroom PLD: {ctx.task.name}").metrics


def fit_pld_examples(cfg: PLDConfig, sel, teacher, student) -> dict:
    """Apply the task's overlong policy to the selection in place (extraction prompts checked against the
    teacher; zero-shot, k-shot and chain-of-thought prompts against the student) and return the counts.
    Makes no call."""
    from stillroom.pld.prompts import extraction_messages, wants_worked_example
    from stillroom.tasks.fit import fit_examples
    from stillroom.tasks.prompts import render_chat

    task, shots = sel.task, sel.shots(cfg.shots)
    counts = {"overlong": 0, "truncated": 0, "skipped": 0}

    def student_prompts(ex):
        out = [(render_chat(task, ex, s, None), 16) for s in ([], shots)]  # evaluate()'s answer budget
        if cfg.cot:
            out.append((render_chat(task, ex, [], None, reason=True), cfg.cot_max_tokens))
        return out

    for name, backend, prompts_of in (
        ("train", teacher, lambda ex: [(extraction_messages(task, ex, strict=True, demo=wants_worked_example(teacher)),
                                        cfg.teacher_max_tokens)]),
        ("val", student, student_prompts),
        ("test", student, student_prompts),
    ):
        kept, c = fit_examples(task, getattr(sel, name), backend, prompts_of, policy=cfg.task.overlong, what=name)
        setattr(sel, name, kept)
        counts = {k: counts[k] + c[k] for k in counts}
    return {"policy": cfg.task.overlong, **counts}


def build_pld(ctx: RouteContext, embedder: Embedder | None) -> Built:
    """PLD's build: extraction, clustering and synthesis, conflict resolution (the rulebook), the optional
    leave-one-rule-out ablation; deploys the rulebook as the student's system prompt, next to the baselines."""
    cfg: PLDConfig = ctx.cfg
    teacher, student, overlong = ctx.prepared
    teacher_b = ctx.open_teacher(cfg.teacher, backend=teacher)
    # A separate wrapper even when one model plays both parts: the teacher's meter (build cost, spend cap) must
    # count only teacher calls.
    student_b = open_cached_backend(cfg.student, ctx.run.cache_path, None, backend=student)
    usage = lambda: {"teacher": teacher_b.meter.summary(), "student": student_b.meter.summary()}  # noqa: E731
    try:
        phases = _build_rulebook(ctx, teacher_b, student_b, embedder, teacher)
    except BaseException:
        ctx.run.write_json("usage.json", usage())
        raise
    final = phases["final"]
    deployments = _baselines(cfg, ctx, student_b) + [
        Deployment(name="PLD", backend=student_b, model=cfg.student.spec, system_prompt=final.system_prompt(),
                   method=cfg.student_method)]
    sel = ctx.sel
    # the specs the user gave name the models in the report's title; the identities say what they resolved to
    extra = {"teacher": cfg.teacher.spec, "student": cfg.student.spec, "teacher_identity": teacher_b.identity,
             "student_identity": student_b.identity,
             "examples": {"train_extracted": len(sel.train), "val": len(sel.val), "test": len(sel.test)},
             "overlong": overlong, **{k: v for k, v in phases.items() if k != "final"}}
    artifacts = {k: str(ctx.run.file(k)) for k in ("rulebook.json", "rulebook.md", "system_prompt.txt")}
    config_dict = cfg.model_dump(mode="json")
    return Built(deployments=deployments, extra=extra, artifacts=artifacts, usage=usage,
                 report=lambda metrics: pld_report(metrics, final, config_dict), after_eval=_invalid_notes)


def _baselines(cfg: PLDConfig, ctx: RouteContext, student_b) -> list[Deployment]:
    """Zero-shot, k-shot and chain-of-thought with the same student on the same examples."""
    if not cfg.compare_baselines:
        return []
    spec, method = cfg.student.spec, cfg.student_method
    out = [Deployment(name="zero-shot", backend=student_b, model=spec, method=method)]
    if cfg.shots:
        out.append(Deployment(name=f"{cfg.shots}-shot", backend=student_b, model=spec, shots=ctx.shots(cfg.shots),
                              method=method))
    if cfg.cot:
        out.append(Deployment(name="chain-of-thought", backend=student_b, model=spec, method="cot",
                              max_new_tokens=cfg.cot_max_tokens))
    return out


def _invalid_notes(results: dict[str, EvalResult]) -> list[str]:
    return [f"{name}: the student never produced a valid label ({r.metrics['n']} answers, all invalid)."
            for name, r in results.items() if r.metrics.get("invalid_rate") == 1.0]


def _build_rulebook(ctx: RouteContext, teacher_b, student_b, embedder, raw_teacher) -> dict:
    """Phases 1-4 into the run folder; returns the final rulebook and the phases' figures for metrics.json.
    The prompts' shape follows the uncached `raw_teacher`: a base model gets the worked example and every prompt
    field as a stop string, a chat model neither; a base model's reply cut at the token limit is still read from
    its complete first line (it answers the cue, then rambles on), a chat model's is not (that is its reasoning)."""
    cfg: PLDConfig = ctx.cfg
    task, run, notes = ctx.task, ctx.run, ctx.notes
    tparams = GenerationParams(max_tokens=cfg.teacher_max_tokens, temperature=0.0, stop=teacher_stops(raw_teacher))
    demo, cued = wants_worked_example(raw_teacher), completes_raw_text(raw_teacher)
    # Phase 1: extraction.
    instructions = extract_instructions(task, ctx.sel.train, teacher_b, tparams, demo, completes_cue=cued)
    run.write_jsonl("extractions.jsonl", [asdict(i) for i in instructions])
    ok = [i for i in instructions if i.ok]
    failed = len(instructions) - len(ok)
    dropped = drop_counts(instructions)
    if failed:
        notes.append(extraction_note(dropped, len(instructions)))

    def student_eval(rb: Rulebook | None, examples, name: str) -> EvalResult:
        # Model selection on the validation split: the same evaluator, the rulebook as the system prompt.
        return ctx.evaluate(Deployment(name=name, backend=student_b, model=cfg.student.spec,
                                       system_prompt=rb.system_prompt() if rb else None, method=cfg.student_method),
                            examples)

    # Phase 2: clustering and synthesis.
    rulebook, coverage = _cluster_and_synthesize(ctx, ok, teacher_b, tparams, student_eval, embedder, demo, cued)
    # Phase 3: conflict resolution, every version kept.
    resolution: Resolution = resolve_conflicts(
        task, rulebook, teacher_b, lambda rb: student_eval(rb, ctx.sel.val, f"val v{rb.version}"),
        # The resolver rewrites the whole list after its analysis: twice the budget of one rule.
        GenerationParams(max_tokens=2 * cfg.teacher_max_tokens, temperature=0.0, stop=tparams.stop),
        max_rounds=cfg.max_rounds, patience=cfg.patience, max_failures=cfg.failures_per_round,
        max_successes=cfg.successes_per_round, seed=cfg.task.seed,
        on_version=lambda rb, _val: run.write_text(f"rulebook_v{rb.version}.json", rb.to_json()),
    )
    final = resolution.best
    final.meta.update({"val_macro_f1": resolution.best_val.metrics["macro_f1"] if resolution.best_val else None})
    named, unnamed = _label_coverage(final, ctx, coverage)
    # Phase 4: the deployable artefacts.
    run.write_text("rulebook.json", final.to_json())
    run.write_text("rulebook.md", final.to_markdown())
    run.write_text("system_prompt.txt", final.system_prompt() + "\n")
    ablation = []
    if cfg.ablation and final.rules:
        base = resolution.best_val.metrics["macro_f1"]
        for k, r in enumerate(final.rules):
            rb = Rulebook(task=final.task, rules=[x for j, x in enumerate(final.rules) if j != k], version=final.version)
            f1 = student_eval(rb, ctx.sel.val, f"ablate {r.id}").metrics["macro_f1"]
            ablation.append({"rule": r.id, "text": r.text, "val_macro_f1_without": f1, "effect": base - f1})
    sp_tokens = student_b.count_tokens(final.system_prompt()) if final.rules else 0
    return {"final": final, "extraction": {"instructions": len(instructions), "readable": len(ok), "failed": failed,
                                           "dropped": dropped, "retried": retried(instructions),
                                           "kept_truncated": kept_truncated(instructions)},
            "clustering": {k: v for k, v in coverage.items() if k != "per_cluster"},
            "conflict_rounds": [asdict(r) for r in resolution.rounds],
            "rulebook": {"version": final.version, "rules": len(final.rules), "system_prompt_tokens": sp_tokens,
                         "labels_named": named, "labels_not_named": unnamed,
                         "label_coverage": len(named) / (len(named) + len(unnamed)) if named or unnamed else None},
            "ablation": ablation}


def _label_coverage(final: Rulebook, ctx: RouteContext, coverage: dict) -> tuple[list, list]:
    """(labels the final rules name, labels they do not). Coverage is what the deployed rules say, not which
    clusters their examples came from. Fewer than half named puts a warning first in the notes (it heads the
    report): a rulebook that names few answers cannot lead the student to the rest."""
    task, notes = ctx.task, ctx.notes
    label_set = list(task.labels) if task.labels else sorted({str(e.label) for e in ctx.sel.train})
    named = final.named_labels(label_set)
    unnamed = [lab for lab in label_set if lab not in named]
    if unnamed and final.rules:
        no_cluster = set(coverage["uncovered_labels"])
        notes.append(f"Coverage: the {len(final.rules)} rule(s) name only {', '.join(map(str, named)) or 'no label'}; "
                     f"no rule names {', '.join(map(str, unnamed))}"
                     + (" (no cluster held their examples either: minority labels can vanish in clustering)."
                        if no_cluster and set(unnamed) <= no_cluster else "."))
    if label_set and len(named) < len(label_set) / 2:
        notes.insert(0, f"Warning: the rules name only {len(named)} of the task's {len(label_set)} labels "
                        f"({', '.join(map(str, named)) or 'none'}); the student gets no rule that leads to "
                        f"{', '.join(map(str, unnamed))}.")
    return named, unnamed


def extraction_note(dropped: dict[str, int], total: int) -> str:
    """The run's note on extractions that were dropped, by reason."""
    words = {"unreadable": "unreadable", "truncated": "cut at the token limit (teacher_max_tokens) before their "
             "instruction line", "copies_example": "copies of the prompt's worked example",
             "foreign_label": "leading to an answer the task does not have",
             "wrong_label": "leading to another answer than their example's",
             "quotes_input": "quoting their example's input instead of describing it"}
    parts = [f"{n} {words[r]}" for r, n in dropped.items() if n]
    return (f"Extraction: {sum(dropped.values())} of {total} teacher replies were dropped after one retry: "
            + "; ".join(parts) + " (see extractions.jsonl).")


def _cluster_and_synthesize(ctx: RouteContext, ok, teacher_b, tparams, student_eval, embedder, demo=True,
                            cued=False):
    """Phase 2: embed the readable instructions, cluster them (one eps, or the sweep's best on validation) and
    synthesise one rule per cluster; writes clusters.json. Returns the rulebook and the coverage report."""
    cfg: PLDConfig = ctx.cfg
    task, notes = ctx.task, ctx.notes
    embed = embedder or load_embedder(cfg.embedder, base_url=cfg.teacher.base_url, api_key_env=cfg.teacher.api_key_env)
    emb = embed([i.text for i in ok]) if ok else np.zeros((0, 1))
    label_set = list(task.labels) if task.labels else sorted({str(e.label) for e in ctx.sel.train})
    sweep = cfg.eps_sweep or [cfg.eps]
    candidates = []
    for eps in sweep:
        clustering = cluster_instructions(emb, eps, cfg.min_samples)
        rb = synthesize_rules(task, ok, emb, clustering, teacher_b, tparams, demo, completes_cue=cued)
        score = student_eval(rb, ctx.sel.val, f"val eps={eps}").metrics["macro_f1"] if len(sweep) > 1 else None
        candidates.append((eps, clustering, rb, score))
    eps, clustering, rulebook, _ = max(candidates, key=lambda c: (c[3] or 0.0, -abs(c[0] - cfg.eps)))
    coverage = coverage_report([i.label for i in ok], clustering, label_set)
    coverage["sweep"] = [{"eps": c[0], "clusters": len(c[1].clusters), "noise_share": c[1].noise_share,
                          "val_macro_f1": c[3]} for c in candidates]
    ctx.run.write_json("clusters.json", {**coverage, "assignments": [
        {"example_id": i.example_id, "label": i.label, "cluster": a, "instruction": i.text}
        for i, a in zip(ok, clustering.assignments, strict=True)]})
    if not clustering.clusters:
        notes.append(f"Clustering: every instruction was noise at eps={eps}, min_samples={cfg.min_samples}; no "
                     "rule was synthesised. The conflict loop starts from an empty rulebook. Try a larger eps, "
                     "a smaller min_samples or eps_sweep.")
    if rulebook.meta.get("synthesis_fallbacks"):
        why = ", ".join(f"{n} {r}" for r, n in rulebook.meta.get("synthesis_rejected", {}).items())
        notes.append(f"Synthesis: {rulebook.meta['synthesis_fallbacks']} cluster(s) got no usable rule in two "
                     f"replies ({why or 'unreadable'}); their medoid instruction stands in (origin 'medoid').")
    return rulebook, coverage
