"""Command line: `python -m lowvram_ft COMMAND ...`.

Parsing, config resolution and error reporting only; each command's work lives in its module and is
imported when the command runs, so `--help` and `--dry-run` never load torch.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .config import ConfigError, default_dataset, describe_fields, family_recipe, load_config
from .errors import EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY as EXIT_OOM, UserError, is_out_of_memory
from . import chat, data, evaluate, export, folders, plan
from .plan import inputs as plan_inputs
from .evaluate import report, rewards, scoring
from . import bench, report as run_report
from .bench.cli import add_bench_arguments
from .train import grpo, pipeline
from .terminal import VERBOSE_ENV
from .train.checkpoints import resume_config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # model.quiet_known_noise: show the libraries' own output
    try:
        return int(args.run(args) or 0)
    except ConfigError as error:
        return fail(error.problems)
    except UserError as error:  # every error meant for the user: its lines and its exit code (errors.py)
        return fail(error.lines(), error.exit_code)
    except KeyboardInterrupt as error:  # run_state.Interrupted says what was saved and how to resume
        print(getattr(error, "message", None) or "interrupted", file=sys.stderr)
        return getattr(error, "exit_code", 130)
    except Exception as error:  # noqa: BLE001 — errors of the libraries that mean bad input or a full GPU
        known = library_error(error)
        if known is None:
            raise
        return fail(known[1].splitlines(), known[0])


def fail(lines: list[str], code: int = EXIT_BAD_INPUT) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return code


def library_error(error: Exception) -> tuple[int, str] | None:
    """(exit code, one line) for a library's error that means a full GPU or an unreadable file, else
    None (a bug: traceback). Our own errors are UserErrors and never get here."""
    if is_out_of_memory(error):
        return EXIT_OOM, f"out of memory: {str(error).splitlines()[0][:300]}"
    if isinstance(error, OSError) and error.filename:  # a file no loader checked first (unreadable, full disk)
        return EXIT_BAD_INPUT, f"{error.filename}: {error.strerror or error} — check the path, its permissions and free space"
    return None


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowvram_ft",
        description="Fine-tune gpt-oss and other open models on one GPU (14-65 GB), on Unsloth.",
        epilog="Settings: --config FILE, then group.key=value overrides (see `train --help-config`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="LoRA / QLoRA / full fine-tuning of one model on one GPU (or CPU)")
    add_run_options(train)
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, load nothing")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its newest complete checkpoint, with its saved config")
    train.add_argument("--force", action="store_true", help="train even when the planner predicts it will not fit")
    train.add_argument("--help-config", action="store_true", help="list every setting with its default and meaning")
    train.add_argument("--from-run", metavar="RUN", help="start from a finished run's model and adapter "
                       "(e.g. train.method=grpo after SFT): sets model.name, model.tokenizer and model.adapter=RUN/adapter")
    train.set_defaults(run=run_train)

    data = sub.add_parser("data", help="statistics, rendered examples with trained tokens, --check, --export")
    add_run_options(data)
    data.add_argument("--show", type=int, default=3, metavar="N", help="rendered examples to show (default 3)")
    data.add_argument("--export", metavar="FILE.jsonl",
                      help="write source (FILE:ROW), text, input_ids and labels per training example, in input order")
    data.add_argument("--check", action="store_true", help="validate every row, report every problem, load no model")
    data.set_defaults(run=run_data)

    score = sub.add_parser("score", help="score completions.jsonl for reasoning language, offline (no model)")
    score.add_argument("--input", required=True, metavar="FILE.jsonl")
    score.add_argument("--output", metavar="FILE.jsonl", help="per-line scores (default: INPUT.scored.jsonl)")
    score.add_argument("--answer-in", choices=("user", "target"), default="user",
                       help="expect the final answer in the user's language (default) or the target language")
    score.add_argument("--rewards", action="store_true",
                       help='add a "rewards" object (the GRPO rewards: language, format, answer_language, accuracy) to each line')
    score.set_defaults(run=run_score)

    evaluate = sub.add_parser("eval", help="before/after reasoning-language evaluation: base vs tuned, same prompts")
    add_run_options(evaluate)
    evaluate.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="a train run folder (its config and adapter)")
    evaluate.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder on top of --model")
    evaluate.set_defaults(run=run_eval, smoke=False)

    smoke = sub.add_parser("smoke", help="one-minute reasoning-language check: a few prompts, short generations")
    add_run_options(smoke)
    smoke.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="a train run folder (its config and adapter)")
    smoke.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder on top of --model")
    smoke.add_argument("--min-think-match", type=float, metavar="X",
                       help="exit 1 when the (tuned, else base) think-match rate of the trained languages "
                       "(of every asked language when they are unknown: no --run) is below X")
    smoke.set_defaults(run=run_eval, smoke=True)

    report = sub.add_parser("report", help="one self-contained HTML page of a run (RUN/report.html), or two runs compared")
    report.add_argument("--run", dest="runs", action="append", required=True, metavar="RUN_DIR",
                        help="a train or eval run folder; give it twice to compare two runs (page: A/compare-B.html)")
    report.add_argument("--out", metavar="FILE.html", help="where to write the page (default RUN/report.html)")
    report.set_defaults(run=run_report_command)

    bench = sub.add_parser("bench", help="peak VRAM and tokens/s: our trainer vs the plain Hugging Face stack")
    bench.set_defaults(run=run_bench)
    add_bench_arguments(bench)

    plan = sub.add_parser("plan", help="predict peak VRAM from config.json alone and recommend what fits")
    add_run_options(plan)
    plan.add_argument("--vram", type=float, metavar="GiB", help="the card's memory in GiB (e.g. 16)")
    plan.add_argument("--compute-capability", type=float, metavar="X.Y",
                      help="the card's CUDA compute capability (7.5 = T4: no bf16, so float16 / float32 layouts)")
    plan.add_argument("--json", action="store_true", help="print everything as one JSON object")
    plan.add_argument("--max-context", action="store_true",
                      help="the longest sequence at batch 1 per card (16-141 GB), next to published anchors")
    # Plan-only settings: a run made with another stack or Unsloth option (e.g. a published notebook).
    plan.add_argument("--stack", choices=plan_inputs.STACKS, help="unsloth (default) or plain transformers + PEFT")
    plan.add_argument("--attention", choices=plan_inputs.ATTENTION_IMPLEMENTATIONS,
                      help="plain transformers' attn_implementation (Unsloth always uses its own)")
    plan.add_argument("--loss", choices=plan_inputs.LOSSES,
                      help="chunked = never full logits (Cut Cross Entropy, Liger); full; inplace = Unsloth <=2024")
    plan.add_argument("--tiled-mlp", action="store_true", help="Unsloth's unsloth_tiled_mlp=True")
    plan.add_argument("--kept-16bit", metavar="LAYOUT",
                      help="linears a 4-bit checkpoint keeps in 16 bits: none, dynamic, or names (q_proj,k_proj,...)")
    plan.set_defaults(run=run_plan)

    export = sub.add_parser("export", help="write a run as lora / merged-16bit / merged-4bit / mxfp4 / gguf, with a model card")
    export.add_argument("--run", dest="run_dir", required=True, metavar="RUN_DIR", help="a train run folder (its config and adapter)")
    export.add_argument("--format", required=True, choices=("lora", "merged-16bit", "merged-4bit", "mxfp4", "gguf"),
                        help="lora and merged-16bit everywhere (gguf too, with llama.cpp); merged-4bit and mxfp4 need a GPU")
    export.add_argument("--out", metavar="DIR", help="where to write it (default RUN/export/FORMAT)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--gguf-quant", default="q8_0", metavar="Q", help="GGUF quantization (default q8_0; q4_k_m, bf16, ...)")
    export.add_argument("--push", metavar="USER/NAME", help="upload to this Hugging Face Hub repository (token from HF_TOKEN)")
    export.add_argument("--public", action="store_true", help="make the pushed repository public (default private)")
    add_verbose(export)
    export.set_defaults(run=run_export)

    chat = sub.add_parser("chat", help="talk to a run: streaming, multi-turn; /effort, /reset, /exit")
    add_chat_options(chat)
    chat.add_argument("--show-prompt", action="store_true", help="print each rendered prompt (dimmed) before the answer")
    chat.set_defaults(run=run_chat)

    generate = sub.add_parser("generate", help="answer one prompt: the final answer, or analysis + final as --json")
    add_chat_options(generate)
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.add_argument("--json", action="store_true", help='print {"analysis": ..., "final": ..., "truncated": ...}')
    generate.set_defaults(run=run_generate)
    return parser


def add_chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="a train run folder (its config and adapter)")
    p.add_argument("--model", help="Hub id or local folder instead of --run (default: the embedded model)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder on top of --model")
    p.add_argument("--tokenizer", help="tokenizer instead of the model's own ('gpt-oss' = real o200k_harmony, offline)")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"),
                   help="Harmony 'Reasoning:' level (default: the run's data.reasoning_effort)")
    p.add_argument("--reasoning-language", metavar="LANG", help="ask for reasoning in this language (e.g. French)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, gpt-oss's recommendation)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0, gpt-oss's recommendation)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 = off (default, gpt-oss's recommendation)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation limit per answer (default 1024)")
    p.add_argument("--seed", type=int, default=3407, help="sampling seed (chat adds the turn number)")
    add_verbose(p)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (groups: model, lora, data, train, grpo, eval, output)")
    p.add_argument("--model", help="Hub id or local folder (default: the embedded tiny gpt-oss model)")
    p.add_argument("--dataset", action="append", metavar="ID_OR_FILE",
                   help="Hub id, local .jsonl/.json/.csv/.parquet, or 'sample'; repeat to mix")
    p.add_argument("--tokenizer", help="tokenizer instead of the model's own ('gpt-oss' = real o200k_harmony, offline)")
    p.add_argument("--output", metavar="DIR", help="run folder (default runs/<model>-<time>)")
    p.add_argument("overrides", nargs="*", metavar="group.key=value", help="settings overriding the config file")
    add_verbose(p)


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' own warnings and progress bars (hidden when known to be harmless)")


def resolve(args: argparse.Namespace):
    """Config from defaults < --config (or, without one, the model family's recipe) < flags <
    group.key=value (the explicit overrides win)."""
    overrides = resolve_flags(args) + list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
    except OSError as error:  # exists but cannot be read (permissions, I/O error)
        raise unreadable(error, args.config) from None
    if args.config is not None:  # the config decides the recipe and the data set
        return cfg
    recipe = family_recipe(cfg.model.name)
    if recipe:
        print(f"[lowvram_ft] config: no --config for {cfg.model.name}: the 16 GB recipe {' '.join(recipe)} "
              "(flags and overrides still win)", file=sys.stderr)
    dataset = ()
    if not dataset_given(args, overrides) and default_dataset(cfg.model.name) not in cfg.data.dataset:
        dataset = (f"data.dataset=[{quote(default_dataset(cfg.model.name))}]",)
        print(f"[lowvram_ft] data: no --dataset for {cfg.model.name}: {default_dataset(cfg.model.name)}, the data "
              "set this job is built around (--dataset sample for the shipped sample, or a local file)",
              file=sys.stderr)
    if not recipe and not dataset:
        return cfg
    return load_config(None, [*recipe, *dataset, *overrides])


def dataset_given(args: argparse.Namespace, overrides: list[str]) -> bool:
    return bool(getattr(args, "dataset", None)) or any(o.partition("=")[0].strip() == "data.dataset" for o in overrides)


def unreadable(error: OSError, path) -> ConfigError:
    return ConfigError([f"{error.filename or path}: cannot read the file ({error.strerror or error}) — "
                        "check that it exists and is readable"])


def resolve_flags(args: argparse.Namespace) -> list[str]:
    """The named flags as group.key=value overrides."""
    flags = from_run_flags(args.from_run) if getattr(args, "from_run", None) else []
    if args.model:
        flags.append(f"model.name={args.model}")
    if getattr(args, "tokenizer", None):
        flags.append(f"model.tokenizer={args.tokenizer}")
    if args.dataset:
        flags.append("data.dataset=[" + ", ".join(quote(d) for d in args.dataset) + "]")
    if args.output:
        flags.append(f"output.dir={quote(args.output)}")
    if getattr(args, "overwrite", False):
        flags.append("output.overwrite=true")
    return flags


def from_run_flags(run: str) -> list[str]:
    """--from-run RUN as overrides: the run's model and tokenizer, and its adapter to start from (flags
    and overrides given after it still win)."""
    from pathlib import Path

    base = evaluate.run_config(Path(run), [])
    flags = [f"model.name={quote(base.model.name)}", f"model.adapter={quote(str(Path(run) / 'adapter'))}"]
    return flags + ([f"model.tokenizer={quote(base.model.tokenizer)}"] if base.model.tokenizer else [])


def quote(text: str) -> str:
    """A YAML-safe scalar for a value from a flag (paths with ':' or '#', ids with '/')."""
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------- commands


def run_train(args) -> int:
    if args.help_config:
        for key, default, text in describe_fields():
            print(f"{key:34} {default:28} {text}")
        return 0
    cfg = resolve_resume(args) if args.resume else resolve(args)

    if args.dry_run:
        pipeline.dry_run(cfg)
        return 0
    pipeline.train(cfg, force=args.force, resume=args.resume)
    return 0


def resolve_resume(args):
    """The saved config of the run in --output; --config, flags and overrides may change only what does
    not alter the run (checkpoints.resume_config)."""
    from pathlib import Path

    if not args.output:
        raise ConfigError(["--resume: name the run to continue with --output RUN"])
    if args.overwrite:
        raise ConfigError(["--resume with --overwrite: choose one — continue the run, or replace it"])
    try:
        return resume_config(Path(args.output), args.config, resolve_flags(args) + list(args.overrides))
    except OSError as error:
        raise unreadable(error, args.config or Path(args.output) / "config.yaml") from None


def run_data(args) -> int:
    cfg = resolve(args)

    if cfg.train.method == "grpo" and not args.check:  # the prompts GRPO would be given, not SFT training rows
        return grpo.inspect_prompts(cfg, args.show, args.export)
    return data.inspect(cfg, show=args.show, export=args.export, check=args.check)


def run_score(args) -> int:
    output = args.output or str(args.input).removesuffix(".jsonl") + ".scored.jsonl"
    rows = scoring.score_file(args.input, output, answer_in=args.answer_in,
                              extra=rewards.line_rewards if args.rewards else None)
    print(report.labels_line(None, None, "completions scored without a run"))
    report.print_language_table(rows, title=f"reasoning language — {args.input}")
    print(f"per-sample scores: {output}")
    return 0


def run_eval(args) -> int:
    from pathlib import Path

    if args.run_dir:
        run_dir = Path(args.run_dir)
        cfg = evaluate.run_config(run_dir, resolve_flags(args) + list(args.overrides))
        adapter = args.adapter or str(run_dir / "adapter")
        out_dir = Path(args.output) if args.output else run_dir / ("smoke" if args.smoke else "")
    else:
        cfg = resolve(args)
        adapter = args.adapter
        out_dir = Path(args.output) if args.output else Path("runs") / ("smoke" if args.smoke else "eval")
    # A run's folder is in use while it is evaluated into (smoke writes RUN/smoke): no train --overwrite meanwhile.
    with folders.hold(Path(args.run_dir), "evaluating") if args.run_dir else contextlib.nullcontext():
        result = evaluate.run_eval(cfg, adapter, out_dir, smoke=args.smoke,
                                   run_dir=Path(args.run_dir) if args.run_dir else None)
    print(f"evaluation written to {out_dir}")
    run_report.report_after_run(out_dir)
    threshold = getattr(args, "min_think_match", None)
    if threshold is not None:
        phase = "after" if "after" in result["tables"] else "before"
        group = "overall" if result["trained_languages"] is None else "trained"
        rate = next((r["think_rate"] for r in result["tables"][phase] if r["group"] == group), None)
        if rate is None or rate < threshold:
            print(f"error: think match of the {'asked' if group == 'overall' else 'trained'} languages ({phase}) is "
                  f"{'n/a' if rate is None else f'{rate:.3f}'}, below --min-think-match {threshold}", file=sys.stderr)
            return 1
    return 0


def run_report_command(args) -> int:
    path = run_report.write_report(args.runs, args.out)
    print(f"report written to {path}")
    return 0


def run_bench(args) -> int:
    bench.run_bench(args.config, out_dir=args.out, only=args.cases, budgets=args.budgets)
    return 0


def run_plan(args) -> int:
    cfg = resolve(args)

    settings = {"unsloth_kernels": args.stack != "transformers"} if args.stack else {}
    settings.update({name: getattr(args, name) for name in ("attention", "loss") if getattr(args, name)})
    if args.tiled_mlp:
        settings["tiled_mlp"] = True
    if args.kept_16bit:
        layout = args.kept_16bit
        settings["kept_16bit"] = layout if layout in plan_inputs.KEPT_16BIT_LAYOUTS else tuple(layout.split(","))
    return plan.run(cfg, vram_gib=args.vram, compute_capability=args.compute_capability, as_json=args.json,
                    max_context=args.max_context, settings=settings)


def run_export(args) -> int:
    from pathlib import Path

    export.export(Path(args.run_dir), args.format, out=Path(args.out) if args.out else None, push=args.push,
                  public=args.public, overwrite=args.overwrite, gguf_quant=args.gguf_quant)
    return 0


def chat_setup(args):
    """(config, adapter, session, sampling) for chat / generate from --run or --model/--adapter."""
    from pathlib import Path

    if args.run_dir and args.model:
        raise ConfigError(["--run and --model: choose one (a run brings its own model and adapter)"])
    flags = [f"model.tokenizer={args.tokenizer}"] if args.tokenizer else []
    if args.run_dir:
        cfg = evaluate.run_config(Path(args.run_dir), flags)
        adapter = args.adapter or str(Path(args.run_dir) / "adapter")
    else:
        cfg = load_config(None, flags + ([f"model.name={quote(args.model)}"] if args.model else []))
        adapter = args.adapter
    if args.max_new_tokens < 1 or not 0 <= args.temperature < float("inf") or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ConfigError(["--max-new-tokens must be >= 1, --temperature a finite number >= 0 (0 = greedy), "
                           "--top-p in (0, 1], --top-k >= 0"])
    session = chat.Session(reasoning_effort=args.reasoning_effort or cfg.data.reasoning_effort,
                           reasoning_language=args.reasoning_language)
    sampling = chat.Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
    return cfg, adapter, session, sampling


def run_chat(args) -> int:
    cfg, adapter, session, sampling = chat_setup(args)
    return chat.run_chat(cfg, adapter, session, sampling, show_prompt=args.show_prompt)


def run_generate(args) -> int:
    if not args.prompt.strip():
        raise ConfigError(["--prompt is empty — pass the user message, e.g. --prompt 'What is 2+2?'"])
    cfg, adapter, session, sampling = chat_setup(args)
    return chat.run_generate(cfg, adapter, args.prompt, session, sampling, as_json=args.json)
