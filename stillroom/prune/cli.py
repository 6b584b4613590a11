"""Commands of the compression route: `prune analyze|apply`, `selfdistill`, `heal`, `merge slerp`, `specdec`.

`register(app)` adds them to the main Typer app. Models are named as elsewhere in Stillroom ('gemma3-270m',
'hf:PATH') or by a plain folder path. Layer blocks are 0-based and end exclusive everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stillroom.options import NO_OPTIONS, ConfigArg, RunDirOpt, Shared, TaskOpt, shared_options
from stillroom.runs import check_model_destination, claim_run_folder
from stillroom.ui import console, print_notes, print_results, run_guarded

ModelArg = Annotated[str, typer.Option("--model", "-m", help="Model: 'gemma3-270m', 'hf:PATH' or a model folder.")]
EvalTaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="Evaluate the result on this task's test split.")]
EvalLimitOpt = Annotated[int | None, typer.Option(help="Evaluate on a deterministic sample of N test examples.")]
OutOpt = Annotated[Path | None, typer.Option("--run-dir", "--out", "-o", help="Output folder (default: runs/<command>-<hash of the inputs>; a model folder for apply, heal and merge).")]


def _default_out(command: str, config: dict) -> Path:
    from stillroom.runs import run_dir_for

    return run_dir_for(command, config)


def _save_config(dest: Path, command: str, config: dict) -> None:
    """Every command records what it ran in its folder's config.yaml, like the other routes (written last: model
    folders are replaced whole when they are saved)."""
    from stillroom.runs import RunFolder

    RunFolder(dest).save_config({"command": command, **{k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}})


def _selection(task: str | None, limit: int | None, columns: dict | None = None):
    """`--task` of a command that makes a model: its test sample, loaded before the model is built."""
    if not task:
        return None
    from stillroom.config import TaskConfig, validate_config
    from stillroom.route import select

    return select(validate_config(TaskConfig, {"spec": task, **(columns or {})}, source="command line"), limit=limit)


def _evaluate(folder: Path, sel, route: str, config: dict, cost=None) -> None:
    """Evaluate a model a command made on `sel` and record it in its folder."""
    from stillroom.route import evaluate_model_folder

    m = evaluate_model_folder(folder, sel, route=route, config=config, cost=cost)
    print_results(m["conditions"])
    console.print(f"report: [bold]{folder / 'report.html'}[/]")


def _print_analysis(data: dict) -> None:
    t = Table(title=f"angular distance d(l, n), best block per size ({data['samples']} texts)")
    for col in ("n", "best block (drop)", "d", "2nd best", "d"):
        t.add_column(col, justify="right")
    for n, row in data["angular_distance"].items():
        order = sorted(range(len(row)), key=lambda i: row[i])
        second = order[1] if len(order) > 1 else None
        b = data["best_block"][n]
        t.add_row(n, b["drop"], f"{b['distance']:.4f}",
                  "-" if second is None else f"{second}:{second + int(n)}",
                  "-" if second is None else f"{row[second]:.4f}")
    console.print(t)
    bi = Table(title="Block Influence BI(l) = 1 - cos(h[l], h[l+1]) (lowest first)")
    bi.add_column("layer", justify="right")
    bi.add_column("BI", justify="right")
    for i in data["block_influence_order"]:
        bi.add_row(str(i), f"{data['block_influence'][i]:.4f}")
    console.print(bi)
    console.print(f"[dim]{data['index_convention']}[/]")


def analyze_to_folder(model: str, calibration: str, out: Path, samples: int = 64, batch_size: int = 4,
                      max_length: int = 512, seed: int = 0) -> dict:
    """Run the layer analysis and write `angular.json` and `angular_heatmap.png` into `out`."""
    from stillroom.prune.angular import analyze_layers, load_calibration_texts, plot_heatmap
    from stillroom.prune.surgery import load_causal_lm, model_folder
    from stillroom.runs import RunFolder

    folder = model_folder(model)
    texts = load_calibration_texts(calibration, samples, seed=seed)
    m, tok = load_causal_lm(folder)
    analysis = analyze_layers(m, tok, texts, batch_size=batch_size, max_length=max_length, model_name=str(folder),
                              calibration=calibration)
    run = RunFolder(claim_run_folder(out))
    data = analysis.to_json()
    run.write_json("angular.json", data)
    plot_heatmap(analysis, run.file("angular_heatmap.png"))
    return data


def prune_analyze(
    model: ModelArg,
    calibration: Annotated[str, typer.Option(help="Calibration texts: a task spec, a .txt or a .jsonl file.")],
    samples: Annotated[int, typer.Option(help="Calibration texts to average over.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Texts per forward.")] = 4,
    max_length: Annotated[int, typer.Option(help="Tokens per text (truncated).")] = 512,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    run_dir: OutOpt = None,
) -> None:
    """Angular distance d(l, n) for every block (last token, averaged over the calibration texts) and Block
    Influence per layer. Writes angular.json and angular_heatmap.png; names the best block per size n.

    Index convention: 0-based, end exclusive; hidden_states[l] is the input of layer l.
    """

    def body():
        dest = run_dir or _default_out("prune-analyze", {"model": model, "calibration": calibration,
                                                     "samples": samples, "seed": seed})
        data = analyze_to_folder(model, calibration, dest, samples, batch_size, max_length, seed)
        _save_config(dest, "prune analyze", {"model": model, "calibration": calibration, "samples": samples,
                                             "batch_size": batch_size, "max_length": max_length, "seed": seed})
        _print_analysis(data)
        console.print(f"written: [bold]{dest / 'angular.json'}[/], {dest / 'angular_heatmap.png'}")

    run_guarded(body)


def prune_apply(
    model: ModelArg,
    drop: Annotated[str | None, typer.Option(help="Layers to remove, START:END (0-based, end exclusive).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Remove the best block of this size (needs --analysis "
                                                         "or --calibration).")] = None,
    analysis: Annotated[Path | None, typer.Option(help="angular.json from `prune analyze`.")] = None,
    calibration: Annotated[str | None, typer.Option(help="Calibration data, to analyse now.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration texts (with --calibration).")] = 64,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Reload the saved model and generate.")] = True,
    run_dir: OutOpt = None,
) -> None:
    """Remove a block of layers and save a model folder that reloads with plain AutoModelForCausalLM.

    Per-layer indices and per-layer config lists (e.g. Gemma-3 layer_types) are renumbered; the config records
    num_hidden_layers and stillroom_removed_layers (original indices).
    """

    def body():
        from stillroom.errors import ConfigError
        from stillroom.prune.angular import LayerAnalysis
        from stillroom.prune.surgery import model_folder, parse_block, prune_model_folder

        if (drop is None) == (block_size is None):
            raise ConfigError("give exactly one of --drop START:END or --block-size N")
        folder = model_folder(model)
        record = None
        if drop is not None:
            start, end = parse_block(drop)
        else:
            if analysis is not None:
                data = json.loads(Path(analysis).read_text(encoding="utf-8"))
            elif calibration is not None:
                dest = _default_out("prune-analyze", {"model": model, "calibration": calibration,
                                                     "samples": samples, "seed": 0})
                data = analyze_to_folder(model, calibration, dest, samples)
            else:
                raise ConfigError("--block-size needs --analysis angular.json or --calibration DATA")
            start, end, d = LayerAnalysis.from_json(data).best_block(block_size)
            record = {"block_size": block_size, "angular_distance": d, "calibration": data.get("calibration")}
            console.print(f"best block of size {block_size}: drop {start}:{end} (d = {d:.4f})")
        dest = check_model_destination(run_dir or _default_out("pruned", {"model": str(folder), "drop": f"{start}:{end}"}))
        saved = prune_model_folder(folder, start, end, dest, analysis=record)
        _save_config(saved, "prune apply", {"model": model, "drop": f"{start}:{end}", "block_size": block_size,
                                            "analysis": analysis, "calibration": calibration, "samples": samples})
        info = json.loads((saved / "stillroom.json").read_text())
        console.print(f"removed layers {info['removed_layers']} ({info['num_hidden_layers']['before']} -> "
                      f"{info['num_hidden_layers']['after']} layers, {info['parameters']['before']:,} -> "
                      f"{info['parameters']['after']:,} parameters): [bold]{saved}[/]")
        if check:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(saved))
            m = AutoModelForCausalLM.from_pretrained(str(saved))
            ids = tok("The capital of France is", return_tensors="pt")
            with torch.inference_mode():
                g = m.generate(**ids, max_new_tokens=8, do_sample=False)
            console.print(f"reload + generate ok: {tok.decode(g[0, ids['input_ids'].shape[1]:])!r}")

    run_guarded(body)


@shared_options(wait=False)
def selfdistill_cmd(
    teacher: Annotated[str, typer.Option(help="The unpruned model: 'gemma3-270m', 'hf:PATH', 'openai:MODEL'...")],
    task: Annotated[str, typer.Option("--task", "-t", help="A task spec (its training split is rewritten).")],
    limit: Annotated[int | None, typer.Option(help="Rewrite a deterministic sample of N training examples.")] = None,
    shots: Annotated[int, typer.Option(help="Solved examples in the healing prompts (match your evaluation).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Rewrite length budget.")] = 64,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="Send the rewrite prompt as a chat message.")] = False,
    seed_text: Annotated[str, typer.Option(help="Start of every response, e.g. \"Great! Let's think step by "
                                                "step.\" for maths (part of the rewrite).")] = "",
    seed: Annotated[int, typer.Option(help="Split and sampling seed.")] = 0,
    demos: Annotated[bool, typer.Option("--demos/--no-demos", help="Show worked rewrites (unrelated tasks, "
                                        "each ending 'Answer: <label>') before the example; --no-demos "
                                        "sends the method's template alone.")] = True,
    completion: Annotated[str, typer.Option(help="Healing completion of a kept rewrite: 'answer_first' "
                                            "(label, then the rewrite's words; log-likelihood scoring), "
                                            "'rewrite' (as generated, ending with its answer line) or "
                                            "'auto' (rewrite for free-text tasks, else answer_first).")] = "auto",
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (rerun resumes from its cache).")] = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Self-data distillation: the unpruned teacher rewrites each training answer given the question and the
    reference answer; conditional selection keeps a rewrite only if its answer equals the label and it has no
    meta-phrases. Writes selfdistill.jsonl (both versions), sft_original.jsonl, sft_self_data.jsonl and
    selfdistill.json (acceptance share)."""

    def body():
        from stillroom.prune.selfdistill import DEMONSTRATIONS, run_selfdistill
        from stillroom.ui import progress_bar

        columns = opts.task_given()
        dest = run_dir or _default_out("selfdistill", {"teacher": teacher, "task": {"spec": task, **columns}, "limit": limit,
                                                       "shots": shots, "seed": seed, "chat": chat,
                                                       "max_new_tokens": max_new_tokens, "seed_text": seed_text,
                                                       "demos": demos, "completion": completion})
        with progress_bar() as bar:
            job = bar.add_task("rewriting", total=None)
            summary = run_selfdistill(teacher, task, dest, limit=limit, shots=shots, seed=seed,
                                      max_new_tokens=max_new_tokens, chat=chat, seed_text=seed_text,
                                      progress=lambda n: bar.advance(job, n),
                                      demonstrations=DEMONSTRATIONS if demos else (), completion=completion,
                                      task_options=columns)
        console.print(f"kept {summary['kept']}/{summary['examples']} rewrites "
                      f"(acceptance {summary['acceptance']:.1%}); reasons: {summary['reasons']}; "
                      f"{summary['backend_calls']} new teacher calls")
        console.print(f"healing data: [bold]{dest / 'sft_self_data.jsonl'}[/] (self-data), "
                      f"{dest / 'sft_original.jsonl'} (original answers)")

    run_guarded(body)


@shared_options(wait=False)
def heal_cmd(
    model: ModelArg,
    data: Annotated[Path, typer.Option(help="Prompt/completion JSONL (e.g. sft_self_data.jsonl).")],
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters (q_proj,v_proj r=8) or full fine-tuning.")] = True,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (> 0 overrides --epochs).")] = -1,
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    task: EvalTaskOpt = None,
    eval_limit: EvalLimitOpt = None,
    run_dir: OutOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Healing fine-tune of a (pruned) model on prompt/completion data, loss on completions only; saves a plain
    model folder (LoRA folded in). With --task, the healed model is evaluated on the task's test split."""

    def body():
        from stillroom.prune.surgery import model_folder
        from stillroom.train.sft import SFTSettings, heal

        sel = _selection(task, eval_limit, opts.task_given())
        folder = model_folder(model)
        settings = SFTSettings(lora=lora, max_steps=max_steps, epochs=epochs, learning_rate=lr, batch_size=batch_size,
                               grad_accum=grad_accum, lora_r=lora_r, max_length=max_length, seed=seed)
        dest = run_dir or _default_out("healed", {"model": str(folder), "data": str(data), "lora": lora,
                                              "steps": max_steps, "epochs": epochs, "lr": lr, "seed": seed})
        check_model_destination(dest)
        rec = heal(folder, data, dest, settings)
        _save_config(dest, "heal", {"model": model, "data": data, "lora": lora, "max_steps": max_steps, "epochs": epochs,
                                    "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "lora_r": lora_r,
                                    "max_length": max_length, "seed": seed})
        console.print(f"{rec['steps']} steps in {rec['seconds']:.0f} s, loss {rec['first_loss']:.4f} -> "
                      f"{rec['last_loss']:.4f}: [bold]{dest}[/]")
        if task:
            from stillroom.route import BuildCost

            _evaluate(dest, sel, "heal", {"model": model, "data": str(data), "max_steps": max_steps, "task": task,
                                          "eval_limit": eval_limit},
                      BuildCost(seconds=rec["seconds"], training_steps=rec["steps"]))

    run_guarded(body)


@shared_options(wait=False)
def merge_slerp(
    model_a: Annotated[str, typer.Argument(help="Base model A (--factor 0 gives A).")],
    model_b: Annotated[str, typer.Argument(help="Model B (--factor 1 gives B).")],
    # The interpolation factor is --factor (mergekit calls it t): '-t' is --task on every command, so a '--t'
    # option next to it was one typo away from the other.
    t: Annotated[float, typer.Option("--factor", help="Interpolation factor for every tensor (mergekit's t: 0 gives A, "
                                                      "1 gives B).")] = 0.5,
    t_schedule: Annotated[str | None, typer.Option("--factor-schedule", "--t-schedule",
                                                   help="Anchors interpolated across layers, e.g. 0,0.5,1 "
                                                        "(mergekit gradient); overrides --factor.")] = None,
    task: EvalTaskOpt = None,
    eval_limit: EvalLimitOpt = None,
    run_dir: OutOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """SLERP two models of the same shape with mergekit semantics (per tensor; linear when nearly parallel).
    With --task, the merged model is evaluated on the task's test split (result.json, report.html)."""

    def body():
        from stillroom.prune.merge import parse_schedule, slerp_model_folders
        from stillroom.prune.surgery import model_folder

        sel = _selection(task, eval_limit, opts.task_given())
        a, b = model_folder(model_a), model_folder(model_b)
        schedule = parse_schedule(t_schedule) if t_schedule else t
        dest = run_dir or _default_out("merged", {"a": str(a), "b": str(b), "t": schedule})
        check_model_destination(dest)
        saved = slerp_model_folders(a, b, dest, schedule)
        config = {"model_a": model_a, "model_b": model_b, "t": schedule, "task": task, "eval_limit": eval_limit}
        _save_config(saved, "merge slerp", config)
        console.print(f"merged (t={schedule}): [bold]{saved}[/]")
        if task:
            _evaluate(saved, sel, "merge-slerp", config)

    run_guarded(body)


def specdec_cmd(
    target: Annotated[str, typer.Option(help="Target model (the unpruned one).")],
    draft: Annotated[str, typer.Option(help="Draft model (e.g. the pruned one).")],
    prompts: Annotated[str, typer.Option(help="A task spec (test-split prompts), a .txt or a .jsonl file.")],
    k: Annotated[int, typer.Option("--k", help="Draft tokens per round (fixed).")] = 4,
    limit: Annotated[int, typer.Option(help="Prompts to use.")] = 20,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 32,
    run_dir: OutOpt = None,
) -> None:
    """Speculative-decoding check: acceptance rate, mean accepted length per target call and wall-clock
    speed-up of the draft for the target (transformers assisted generation, greedy, fixed K)."""

    def body():
        from stillroom.prune.specdec import load_prompts, measure_speculative
        from stillroom.prune.surgery import load_causal_lm, model_folder
        from stillroom.runs import RunFolder
        from stillroom.ui import progress_bar

        tf, df = model_folder(target), model_folder(draft)
        texts = load_prompts(prompts, limit)
        tm, tok = load_causal_lm(tf)
        dm, _ = load_causal_lm(df)
        with progress_bar() as bar:
            job = bar.add_task("specdec", total=len(texts))
            res = measure_speculative(tm, dm, tok, texts, k=k, max_new_tokens=max_new_tokens,
                                      progress=lambda i, n: bar.update(job, completed=i))
        res.update({"target": str(tf), "draft": str(df), "prompts_from": prompts})
        dest = run_dir or _default_out("specdec", {"target": str(tf), "draft": str(df), "prompts": prompts, "k": k,
                                               "limit": limit, "max_new_tokens": max_new_tokens})
        RunFolder(claim_run_folder(dest)).write_json("specdec.json", res)
        _save_config(dest, "specdec", {"target": target, "draft": draft, "prompts": prompts, "k": k, "limit": limit,
                                       "max_new_tokens": max_new_tokens})
        console.print(f"K={k}: acceptance {res['acceptance_rate']:.3f}, mean accepted length "
                      f"{res['mean_accepted_length']:.2f} tokens/target call, speed-up {res['speedup']:.2f}x "
                      f"({res['rounds']} rounds, identical outputs {res['identical_outputs']:.0%}): "
                      f"[bold]{dest / 'specdec.json'}[/]")

    run_guarded(body)


@shared_options()
def prune_heal_cmd(
    config: ConfigArg = None,
    task: TaskOpt = None,
    student: Annotated[str | None, typer.Option(help="The model to prune: 'gemma3-270m', 'hf:PATH' or a folder.")] = None,
    drop: Annotated[int | None, typer.Option(help="Layers to remove (the contiguous block with the smallest angular distance).")] = None,
    block: Annotated[str | None, typer.Option(help="Remove this block instead, START:END (0-based, end exclusive).")] = None,
    healing: Annotated[str | None, typer.Option(help="sft (gold answers), self-data (selected rewrites) or none.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Healing optimizer steps.")] = None,
    train_limit: Annotated[int | None, typer.Option(help="Heal on a deterministic sample of N training examples.")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluate on a deterministic sample of N test examples.")] = None,
    run_dir: RunDirOpt = None,
    opts: Shared = NO_OPTIONS,
) -> None:
    """Prune + heal as one route: remove the most redundant block of layers (angular distance on the task's
    training prompts), heal the pruned model with SFT on gold answers or with self-data distillation, and evaluate
    it on the test split. Writes angular.json, pruned/, healing_data.jsonl, student/, result.json and report.html;
    rerunning resumes."""

    def body():
        from stillroom.locking import wait_for_holders

        wait_for_holders(opts.wait)  # this command's --wait holds for every run folder it opens
        from stillroom.options import load_config
        from stillroom.prune.route import PruneHealConfig, run_prune_heal
        from stillroom.runs import run_dir_for

        over = {"task": opts.task(task), "student": {"spec": student}, "drop": drop, "block": block,
                "healing": healing, "max_steps": max_steps, "train_limit": train_limit, "eval_limit": eval_limit}
        cfg = load_config(config, PruneHealConfig, over, "--task", bool(task))
        out = run_dir or run_dir_for("prune-heal", cfg)
        m = run_prune_heal(cfg, out)
        print_results(m["conditions"])
        print_notes(m.get("notes"), out / "report.html")

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add the compression commands to the main app."""
    prune_app = typer.Typer(help="Depth pruning: find redundant layer blocks and remove them.", no_args_is_help=True)
    merge_app = typer.Typer(help="Merge two same-shape models.", no_args_is_help=True)
    app.add_typer(prune_app, name="prune")
    app.add_typer(merge_app, name="merge")
    prune_app.command("analyze")(prune_analyze)
    prune_app.command("apply")(prune_apply)
    app.command("selfdistill")(selfdistill_cmd)
    app.command("heal")(heal_cmd)
    app.command("prune-heal")(prune_heal_cmd)
    merge_app.command("slerp")(merge_slerp)
    app.command("specdec")(specdec_cmd)
