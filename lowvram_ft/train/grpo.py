"""GRPO (train.method=grpo): reinforcement learning on the rows' user turns with TRL's GRPOTrainer and
the rewards of evaluate/rewards.py. What the method owns: checking its settings, the prompts (rendered
by the same renderer as evaluation and chat), mapping our config onto GRPOConfig (`grpo_config_kwargs`,
pure), the reward functions in TRL's signature, the completions log, and building the trainer. The run
folder, data, model, LoRA, checkpoints, resume, Ctrl-C, evaluation and summary are the pipeline's.

On a GPU Unsloth has rewritten TRL's GRPOTrainer at import (model.import_unsloth); on the CPU it is
stock TRL on a PEFT model (TRL 1.15 wants use_cpu=True and bf16=False there).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .. import model as models
from ..config import Config, ConfigError
from ..conversation import Conversation
from ..data import DataError, Problem, describe_stats, load_data
from ..device import Device
from ..evaluate.generation import prompt_text, stop_token_ids, uses_harmony
from ..evaluate.languages import normalize_language
from ..evaluate.rewards import TEXT_REWARDS, Sample, check_rewards, load_user_reward, text_rewards
from ..evaluate.scoring import identify_text
from ..harmony import HarmonyOptions
from ..terminal import say
from .trainer import Prepared, optimizer_name, precision_flags, with_our_callbacks

DEFAULT_LEARNING_RATE = 5e-5  # grpo.learning_rate=None: Unsloth's GRPO default (TRL's 1e-6 barely moves a LoRA)
REPETITION_NGRAM, REPETITION_MAX_PENALTY = 4, -1.0  # TRL's repetition penalty on token-id 4-grams
COMPLETIONS_FILE = "completions.jsonl"  # per logged step: prompt, completion, target, every reward


def check(cfg: Config) -> None:
    """train.method=grpo settings that need the rewards' knowledge (names, languages, user functions)
    and the starting adapter; ConfigError (one line each) before anything is loaded or written."""
    problems = check_rewards(cfg.grpo.rewards, cfg.grpo.languages) if cfg.train.method == "grpo" else []
    if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").is_file():
        problems.append(f"model.adapter: {cfg.model.adapter}: no adapter_config.json — pass a run's adapter folder "
                        "(RUN/adapter) or --from-run RUN")
    if problems:
        raise ConfigError(problems)


def grpo_config_kwargs(cfg: Config, device: Device, checkpoint_dir: str) -> dict:
    """Everything GRPOConfig needs, from our config. Pure: plain values in, a dict out."""
    t, g = cfg.train, cfg.grpo
    trackers = [r for r in cfg.output.report_to if r != "none"]
    flags = precision_flags(cfg, device)
    if device.kind == "cpu":  # TRL 1.15 on a CPU: autocast bf16 is refused without a GPU
        flags = {"bf16": False, "fp16": False}
    return dict(
        output_dir=checkpoint_dir,
        use_cpu=device.kind == "cpu",
        **flags,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=1.0,
        top_k=0,
        beta=g.beta,
        scale_rewards=g.scale_rewards,
        reward_weights=list(g.reward_weights) or None,
        learning_rate=g.learning_rate if g.learning_rate is not None else DEFAULT_LEARNING_RATE,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(cfg, device),
        seed=t.seed,
        data_seed=t.seed,
        # MoE load balancing: the model's own weight (gpt-oss 0.9) outweighs the policy loss by one to two
        # orders and moves the adapter when every reward in a group is equal; off unless asked for.
        router_aux_loss_coef=t.router_aux_loss_coef if t.router_aux_loss_coef is not None else 0.0,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # rotation is ours, among complete checkpoints (checkpoints.keep_newest)
        report_to=trackers or "none",
        run_name=Path(checkpoint_dir).parent.name,
        gradient_checkpointing=False,  # Unsloth set up checkpointing on the model
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # target_language, user_language, gold reach the rewards
        log_completions=False,  # ours: COMPLETIONS_FILE in the run folder, with every reward
        use_vllm=False,
    )


def prompt_rows(examples, tokenizer, cfg: Config) -> list[dict]:
    """One GRPO row per example with a user turn: the prompt rendered as evaluation and chat render it
    (instructions + the last user turn; assistant turns ignored), its target reasoning language
    (grpo.languages in turn when given, else the row's own) and the user's language. DataError naming
    FILE:ROW for rows without a user turn or without a language."""
    options = HarmonyOptions(reasoning_effort=cfg.data.reasoning_effort, date=cfg.data.date)
    assigned = list(cfg.grpo.languages)  # as written: the prompt says "reasoning language: Japanese", as eval does
    rows, problems = [], []
    for index, example in enumerate(examples):
        conv = example.item
        users = [m for m in getattr(conv, "messages", ()) if m.role == "user" and m.content.strip()]
        if not users:
            problems.append(Problem(example.where, "messages", "no user turn", "GRPO needs a question to answer: "
                                    "drop the row or add the user's message", "no user turn"))
            continue
        target = assigned[index % len(assigned)] if assigned else conv.reasoning_language
        if not target:
            problems.append(Problem(example.where, "reasoning_language", "no target reasoning language",
                                    "add one to the row or set grpo.languages", "no language"))
            continue
        try:
            code = normalize_language(target)
        except ValueError:
            problems.append(Problem(example.where, "reasoning_language", f"the scorer cannot judge {target!r}",
                                    "set grpo.languages to languages it knows (docs/grpo.md)", "unknown language"))
            continue
        kept = tuple(m for m in conv.messages if m.role in ("system", "developer")) + (users[-1],)
        prompt = Conversation(kept, reasoning_language=target, reasoning_effort=conv.reasoning_effort)
        rows.append({"prompt": prompt_text(prompt, tokenizer, options), "question": users[-1].content,
                     "target_language": code,
                     "user_language": identify_text(users[-1].content).dominant or "en", "gold": conv.gold,
                     "where": example.where})
    if problems:
        raise DataError([str(p) for p in problems])
    return rows


def inspect_prompts(cfg: Config, show: int, export: str | None, console=None) -> int:
    """The `data` command under train.method=grpo: the rows read, the prompts and their target languages,
    and the first `show` prompts exactly as the model will be given them."""
    if export:
        raise DataError(["--export writes tokenized SFT training rows; with train.method=grpo there are none — "
                         "`data` without --export shows the GRPO prompts"])
    from rich.console import Console

    console = console or Console(highlight=False)
    loaded = load_data(cfg)
    rows = prompt_rows(loaded.train, models.load_tokenizer_for(cfg), cfg)
    for line in describe_stats(loaded.stats, {}):
        say(console, line)
    languages = ", ".join(f"{code} {n}" for code, n in sorted(Counter(r["target_language"] for r in rows).items()))
    say(console, f"prompts  {len(rows)} for GRPO (assistant turns ignored), target languages {languages}, "
                 f"{sum(r['gold'] is not None for r in rows)} with a gold answer")
    for n, row in enumerate(rows[:show]):
        say(console, f"\n── prompt {n + 1}: {row['where']} (target {row['target_language']}) ──")
        console.print(row["prompt"], markup=False, highlight=False, soft_wrap=True)
    return 0


class RewardBook:
    """The text rewards of one batch of completions, computed once for all reward functions (they are
    called one after another on the same batch), and written with their completions to COMPLETIONS_FILE
    on logged steps (so reward hacking can be read back)."""

    def __init__(self, tokenizer, harmony: bool, answer_in: str, path: Path | None, every: int):
        self.tokenizer, self.harmony, self.answer_in = tokenizer, harmony, answer_in
        self.stops = set(stop_token_ids(tokenizer)) | {tokenizer.eos_token_id}
        self.path, self.every = path, every
        self.key, self.values = None, []

    def rewards(self, completion_ids, target_language, user_language, gold, question, trainer_state=None) -> list[dict]:
        step = trainer_state.global_step if trainer_state is not None else None
        key = (step, tuple(map(tuple, completion_ids)), tuple(target_language))
        if key != self.key:
            texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in completion_ids]
            samples = [Sample(text, target, user or "en", g, truncated=not ids or ids[-1] not in self.stops,
                              harmony=self.harmony)
                       for text, ids, target, user, g in zip(texts, completion_ids, target_language, user_language, gold)]
            self.key, self.values = key, [text_rewards(s, self.answer_in) for s in samples]
            self.record(trainer_state, question, samples, self.values)
        return self.values

    def record(self, state, questions, samples, values) -> None:
        step = (state.global_step + 1) if state is not None else 0  # rewards are computed for the coming step
        if self.path is None or (step % self.every and step != 1) or (state is not None and not state.is_world_process_zero):
            return
        with self.path.open("a", encoding="utf-8") as f:
            for question, sample, value in zip(questions, samples, values):
                f.write(json.dumps({"step": step, "target_language": sample.target_language, "question": question,
                                    "completion": sample.completion, "truncated": sample.truncated, "rewards": value},
                                   ensure_ascii=False) + "\n")


def reward_functions(cfg: Config, book: RewardBook) -> list:
    """One callable per grpo.rewards entry, named after it, so TRL logs rewards/<name>/mean|std."""
    functions = []
    for name in cfg.grpo.rewards:
        if name in TEXT_REWARDS:
            functions.append(text_reward(name, book))
        elif name == "repetition":
            from trl.rewards import get_repetition_penalty_reward

            functions.append(named("repetition", get_repetition_penalty_reward(REPETITION_NGRAM, REPETITION_MAX_PENALTY)))
        else:
            functions.append(load_user_reward(name))
    return functions


def text_reward(name: str, book: RewardBook):
    def reward(prompts, completions, completion_ids, target_language, user_language, gold, question,
               trainer_state=None, **_):
        return [v[name] for v in book.rewards(completion_ids, target_language, user_language, gold, question, trainer_state)]

    reward.__name__ = name
    return reward


def named(name: str, function):
    def reward(*args, **kwargs):
        return function(*args, **kwargs)

    reward.__name__ = name
    return reward


def prepare(model, tokenizer, examples, cfg: Config, device: Device, console) -> Prepared:
    """GRPO's training data (the rendered prompts, their languages) and how its GRPOTrainer is built."""
    rows = prompt_rows(examples, tokenizer, cfg)
    stats = {"prompts": len(rows), "target_languages": dict(sorted(Counter(r["target_language"] for r in rows).items()))}

    def build(run_dir: Path, callbacks):
        return build_trainer(model, tokenizer, rows, cfg, device, run_dir, callbacks)

    return Prepared(stats, False, "off: GRPO generates its own sequences", build)


def build_trainer(model, tokenizer, rows: list[dict], cfg: Config, device: Device, run_dir: Path, callbacks=()):
    """A GRPOTrainer over the rendered prompts, with our callbacks first (as the SFT trainer has them)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    book = RewardBook(tokenizer, uses_harmony(tokenizer), cfg.eval.answer_in, run_dir / COMPLETIONS_FILE,
                      cfg.train.logging_steps)
    dataset = Dataset.from_list([{k: v for k, v in row.items() if k != "where"} for row in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(cfg, book),
                          args=GRPOConfig(**grpo_config_kwargs(cfg, device, str(run_dir / "checkpoints"))),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))
    return with_our_callbacks(trainer, callbacks)


def describe_settings(cfg: Config) -> str:
    """One line for the dry run: what each step generates and what it is paid for."""
    g, t = cfg.grpo, cfg.train
    prompts = t.batch_size * t.gradient_accumulation_steps // g.num_generations
    weights = list(g.reward_weights) or [1.0] * len(g.rewards)
    paid = " + ".join(f"{w:g} x {name}" for w, name in zip(weights, g.rewards))
    return (f"{prompts} prompt(s) x {g.num_generations} completions of <= {g.max_completion_length} tokens per step, "
            f"reward {paid}, beta {g.beta:g}, languages {', '.join(g.languages) or 'from each row'}, "
            f"start from {cfg.model.adapter or 'a new adapter'}")
