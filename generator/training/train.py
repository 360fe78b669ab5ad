"""Train the adapter generator: self-supervised (completion + reconstruction), then instructions.

One script from a laptop CPU to many GPUs: `accelerate launch -m genadapter.cli train ...` gives
DDP; bf16 autocast on GPU; resumable checkpoints; a progress bar; metrics as JSONL + a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm import tqdm
from transformers import PreTrainedModel

from generator.lora import applied
from generator.model import add_states
from generator.pipeline import AdapterPipeline, save_generator
from generator.training.data import PRETRAIN_SOURCES, QA_SETS, default_data_dir, load_split
from generator.training.evaluate import EvalConfig, Evaluator, greedy_ids, qa_sample
from generator.training.tasks import (
    PHRASINGS,
    answer_ids,
    by_task,
    chat_ids,
    cls_prompt,
    demos_text,
    qa_prompt,
    sample_demos,
)

IGNORE = -100  # label of tokens without loss


@dataclass
class TrainConfig:
    out_dir: Path
    data_dir: Path = field(default_factory=default_data_dir)
    window: int = 128  # W during training; a shorter window than serving keeps CPU steps cheap
    windows: int = 4  # context windows per self-supervised sequence
    max_context_windows: int = 8  # instruction contexts are cut to this many windows
    batch_size: int = 1
    # self-supervised text: pretrain rows of these sources, and train contexts of these QA sets
    pretrain_texts: Sequence[str] = (*PRETRAIN_SOURCES, *QA_SETS)
    pretrain_steps: int = 600
    instruct_steps: int = 300
    instruct_pretrain_mix: float = 0.25  # share of self-supervised steps while instruction tuning
    # how often each instruction source is drawn: (*QA_SETS, few-shot classification)
    instruct_weights: Sequence[float] = (0.35, 0.35, 0.3)  # a list when given as flags
    # QA steps: "distill" matches the base model reading the passage in its prompt (the teacher)
    # at every answer token; "answer" is cross-entropy on the dataset's answer
    qa_objective: str = "distill"
    teacher_answers: float = 0.5  # share of distilled answers that are the teacher's own reply
    teacher_max_tokens: int = 24
    eval_every: int = 100  # validation gain recovered every this many steps (0: never)
    eval_examples: int = 64  # validation questions per QA set, before keeping answerable ones
    # QA steps train on only these many questions per set, and validation also measures gain
    # recovered on them: an overfitting check (can the generator store answers it was shown?)
    train_questions: int | None = None
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # skip the update above this gradient norm (a safety net: the SVD keeps only S's numerical
    # rank, whose gradients stay bounded); clipped, an exploding gradient would still move a few
    # weights a full step and inflate their Adam second moments for hundreds of steps
    skip_grad_norm: float = 1000.0
    checkpoint_every: int = 50
    max_minutes: float | None = None  # stop (resumably) after this long
    stop_at: int | None = None  # stop (resumably) after this step, e.g. to change --windows
    grad_checkpointing: bool = False
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.instruct_steps


@dataclass
class Batch:
    """Context windows (b, n, W) that make the adapter, then a target (b, T) scored with it.

    With `teacher` (b, T'), the target is distilled: at each labelled token the student (the
    adapter, target without the context) matches the teacher (no adapter, the context in its
    prompt), whose labelled tokens are the same answer."""

    context: Tensor
    context_mask: Tensor
    target: Tensor
    target_labels: Tensor
    completion: bool  # also score each context window t > 0 with the adapter of windows < t
    teacher: Tensor | None = None
    teacher_labels: Tensor | None = None

    def tokens(self) -> int:
        return int(self.context_mask.sum() + (self.target_labels != IGNORE).sum())


def labelled_logits(model: PreTrainedModel, ids: Tensor, labels: Tensor) -> Tensor:
    """Logits (N, V) of the positions that predict a labelled token, in row-major order; the
    lm_head (49K x 576 on SmolLM2) runs on those positions only."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    return model.get_output_embeddings()(hidden[labels[:, 1:] != IGNORE]).float()


def distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) per position, averaged: the teacher's whole next-token
    distribution, not one answer token, is the target."""
    t = F.log_softmax(teacher, -1)
    return (t.exp() * (t - F.log_softmax(student, -1))).sum(-1).mean()


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over positions whose label is not IGNORE."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


class Objective(nn.Module):
    """The training loss; an nn.Module so DDP syncs the generator's gradients."""

    def __init__(self, pipeline: AdapterPipeline) -> None:
        super().__init__()
        self.generator = pipeline.generator
        self._pipeline = [pipeline]  # in a list: the frozen base model is not a submodule

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        pipeline = self._pipeline[0]
        state, factors, completion = None, None, []
        for t in range(batch.context.shape[1]):
            ids, mask = batch.context[:, t], batch.context_mask[:, t]
            score = batch.completion and t > 0
            s, logits = pipeline.read_window(ids, mask, factors, logits=score)
            if score:
                assert logits is not None
                completion.append(lm_loss(logits, ids.masked_fill(mask == 0, IGNORE)))
            state = add_states(state, s)
            factors = self.generator.lora(state)
        model = pipeline.base.model
        if batch.teacher is not None:
            assert batch.teacher_labels is not None
            with torch.no_grad():
                teacher = labelled_logits(model, batch.teacher, batch.teacher_labels)
            with applied(factors):
                student = labelled_logits(model, batch.target, batch.target_labels)
            loss = distill_loss(student, teacher)
            return {"loss": loss, "distill": loss}
        with applied(factors):
            logits = model(input_ids=batch.target).logits
        target = lm_loss(logits, batch.target_labels)
        if not completion:  # an instruction, or a single self-supervised window
            return {"loss": target, "reconstruction" if batch.completion else "instruct": target}
        completion_loss = torch.stack(completion).mean()
        return {
            "loss": 0.5 * completion_loss + 0.5 * target,
            "completion": completion_loss,
            "reconstruction": target,
        }


class BatchSampler:
    """Endless random batches from the train splits (never validation or test)."""

    def __init__(self, pipeline: AdapterPipeline, config: TrainConfig, rank: int) -> None:
        self.pipeline, self.config = pipeline, config
        self.rng = random.Random(config.seed * 1000 + rank)
        tok = pipeline.base.tokenizer
        span = config.window * config.windows
        self.qa = {
            name: load_split(config.data_dir, name, "train")
            if config.train_questions is None
            else qa_sample(config.data_dir, name, "train", config.train_questions, config.seed)
            for name in QA_SETS
        }
        self.cls = by_task(load_split(config.data_dir, "cls", "train"))
        self.sequences: list[list[int]] = []
        for text in self.pretrain_texts():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            self.sequences += [ids[i : i + span] for i in range(0, len(ids) - span + 1, span)]

    def pretrain_texts(self) -> list[str]:
        """English pretrain documents of the chosen sources, then each chosen QA set's passages."""
        names = self.config.pretrain_texts
        texts = [
            r["text"]
            for r in load_split(self.config.data_dir, "pretrain", "train")
            if r["lang"] == "en" and r["source"] in names
        ]  # SmolLM2 is an English model
        for name in QA_SETS:
            if name in names:
                texts += dict.fromkeys(r["context"] for r in self.qa[name])  # unique, in order
        return texts

    def pretrain(self) -> Batch:
        c = self.config
        rows = torch.tensor([self.rng.choice(self.sequences) for _ in range(c.batch_size)])
        context = rows.view(c.batch_size, c.windows, c.window)
        j = self.rng.randrange(c.windows)  # reconstruct a window the adapter has read
        return Batch(context, torch.ones_like(context), context[:, j], context[:, j].clone(), True)

    def source(self) -> str:
        """The instruction source of the next batch: a QA set or "cls"."""
        return self.rng.choices((*QA_SETS, "cls"), self.config.instruct_weights)[0]

    def instruct_example(self, source: str) -> tuple[str, str, str]:
        """(context, user message, answer) from a QA set or few-shot classification."""
        if source in self.qa:
            row = self.rng.choice(self.qa[source])
            return row["context"], qa_prompt(row["question"]), row["answer"]
        task = self.rng.choice(sorted(self.cls))
        row = self.rng.choice(self.cls[task])
        demos = sample_demos(self.cls, task, self.rng.choice((4, 16)), self.rng, row["input"])
        return demos_text(demos), cls_prompt(row), row["label"]

    def context_ids(self, text: str) -> list[int]:
        c = self.config
        ids = self.pipeline.base.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: c.window * c.max_context_windows]

    def instruct(self) -> Batch:
        source = self.source()
        if source in self.qa and self.config.qa_objective == "distill":
            return self.distill(source)
        contexts, prompts, answers = [], [], []
        for _ in range(self.config.batch_size):
            context, prompt, answer = self.instruct_example(source)
            contexts.append(self.context_ids(context))
            prompts.append(chat_ids(self.pipeline.base.tokenizer, prompt))
            answers.append(answer_ids(self.pipeline.base.tokenizer, answer))
        return self.collate(contexts, *_with_answers(prompts, answers))

    def distill(self, source: str) -> Batch:
        """Questions about passages in any phrasing; the teacher reads the passage (as cut for
        the adapter) in its prompt. Answers: the dataset's, or the teacher's own greedy reply."""
        c, tok = self.config, self.pipeline.base.tokenizer
        contexts, students, teachers, answers = [], [], [], []
        for _ in range(c.batch_size):
            row, phrasing = self.rng.choice(self.qa[source]), self.rng.choice(PHRASINGS)
            ids = self.context_ids(row["context"])
            contexts.append(ids)
            passage = cast(str, tok.decode(ids))  # one sequence decodes to one str
            students.append(chat_ids(tok, qa_prompt(row["question"], None, phrasing)))
            teachers.append(chat_ids(tok, qa_prompt(row["question"], passage, phrasing)))
            answers.append(answer_ids(tok, row["answer"]))
        own = [i for i in range(c.batch_size) if self.rng.random() < c.teacher_answers]
        if own:
            replies = greedy_ids(
                self.pipeline, [teachers[i] for i in own], None, c.teacher_max_tokens, len(own)
            )
            for i, reply in zip(own, replies, strict=True):
                answers[i] = reply
        batch = self.collate(contexts, *_with_answers(students, answers))
        batch.teacher, batch.teacher_labels = self.pad(*_with_answers(teachers, answers))
        return batch

    def pad(self, targets: list[list[int]], labels: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Right-padded (b, T) ids and labels; padding is never labelled."""
        pad, t = self.pipeline.base.tokenizer.pad_token_id or 0, max(map(len, targets))
        return (
            torch.tensor([x + [pad] * (t - len(x)) for x in targets]),
            torch.tensor([x + [IGNORE] * (t - len(x)) for x in labels]),
        )

    def collate(
        self, contexts: list[list[int]], targets: list[list[int]], labels: list[list[int]]
    ) -> Batch:
        """Contexts in windows (b, n, W) with their mask, padded to whole windows (to the
        longest context when it fits one window); targets padded (b, T)."""
        longest = max(map(len, contexts))
        n = math.ceil(longest / self.config.window)
        w = self.config.window if n > 1 else longest  # one window: no padding past the longest
        context = torch.full((len(contexts), n * w), self.pipeline.base.tokenizer.pad_token_id or 0)
        context_mask = torch.zeros_like(context)
        for i, x in enumerate(contexts):
            context[i, : len(x)] = torch.tensor(x)
            context_mask[i, : len(x)] = 1
        shape = (len(contexts), n, w)
        return Batch(
            context.view(shape), context_mask.view(shape), *self.pad(targets, labels), False
        )

    def batch(self, step: int) -> tuple[str, Batch]:
        """The batch of `step`: self-supervised first, then mostly instructions."""
        instruct = (
            step >= self.config.pretrain_steps
            and self.rng.random() >= self.config.instruct_pretrain_mix
        )
        return ("instruct", self.instruct()) if instruct else ("pretrain", self.pretrain())


def _with_answers(
    prompts: list[list[int]], answers: list[list[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt + answer ids, and labels that mark the answer tokens only."""
    pairs = list(zip(prompts, answers, strict=True))
    return [p + a for p, a in pairs], [[IGNORE] * len(p) + a for p, a in pairs]


def _to(batch: Batch, device: torch.device) -> Batch:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    # Batch's fields by name: a dict can hold their several types only as Any
    moved: dict[str, Any] = {
        k: v.to(device) if isinstance(v, Tensor) else v for k, v in fields.items()
    }
    return Batch(**moved)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save keeps the previous checkpoint


def _drop_metrics_after(metrics_file: Path, step: int) -> None:
    if metrics_file.is_file():
        lines = metrics_file.read_text().splitlines(keepends=True)
        metrics_file.write_text("".join(x for x in lines if json.loads(x)["step"] <= step))


def train(pipeline: AdapterPipeline, config: TrainConfig) -> Path:
    """Train `pipeline.generator` in place; returns the folder of the final generator.

    Resumes from `out_dir/checkpoint.pt` when it exists (same config assumed).
    """
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    base = pipeline.base.model.to(accelerator.device)
    if config.grad_checkpointing:
        base.gradient_checkpointing_enable()
        base.train()  # HF checkpoints only in train mode; Llama has no dropout to switch on
    objective = Objective(pipeline).to(accelerator.device)
    objective.generator.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(
        objective.generator.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    sampler = BatchSampler(pipeline, config, accelerator.process_index)

    ckpt_path, step = out / "checkpoint.pt", 0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        objective.generator.load_state_dict(ckpt["generator"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.rng.setstate(ckpt["rng"])
        step = ckpt["step"]
        _drop_metrics_after(out / "metrics.jsonl", step)  # those steps run again
    model, optimizer = accelerator.prepare(objective, optimizer)

    def checkpoint() -> None:
        if accelerator.is_main_process:
            _save_checkpoint(
                ckpt_path,
                {
                    "generator": objective.generator.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "rng": sampler.rng.getstate(),
                    "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
                },
            )

    def log_validation() -> None:
        if not accelerator.is_main_process:
            return
        scores = validate(pipeline, config)
        metrics.write(json.dumps({"step": step, "kind": "validation", **scores}) + "\n")
        metrics.flush()
        line = (
            f"step {step}: validation gain recovered {scores['gain']:.1f}% "
            f"(another passage's adapter {scores['other_gain']:.1f}%)"
        )
        if "train/gain" in scores:
            line += f", on the questions trained on {scores['train/gain']:.1f}%"
        bar.write(line)

    started = time.monotonic()
    end = min(config.total_steps, config.stop_at or config.total_steps)
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        desc="train",
        disable=not accelerator.is_main_process,
    )
    with (out / "metrics.jsonl").open("a") as metrics:
        if config.eval_every and step == 0:  # where the run starts from
            log_validation()
        while step < end:
            t0 = time.monotonic()
            kind, batch = sampler.batch(step)
            batch = _to(batch, accelerator.device)
            with accelerator.autocast():
                losses = model(batch)
            grad_norm = float("nan")
            if torch.isfinite(losses["loss"]):
                accelerator.backward(losses["loss"])
                grad_norm = float(
                    accelerator.clip_grad_norm_(objective.generator.parameters(), config.grad_clip)
                )
            if grad_norm <= config.skip_grad_norm:  # False for NaN: a degenerate SVD
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_per_s = batch.tokens() * accelerator.num_processes / (time.monotonic() - t0)
            row = {
                "step": step,
                "kind": kind,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": round(tokens_per_s, 1),
                **{k: round(v.item(), 4) for k, v in losses.items()},
            }
            if accelerator.is_main_process:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.set_postfix(kind=kind, loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
            bar.update()
            if config.eval_every and step % config.eval_every == 0:
                log_validation()
            if step % config.checkpoint_every == 0 or step == end:
                checkpoint()
            if config.max_minutes and time.monotonic() - started > 60 * config.max_minutes:
                checkpoint()
                break
    bar.close()
    final = out / "generator"
    if accelerator.is_main_process:
        objective.generator.eval()
        save_generator(objective.generator, final)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    return final


def validate(pipeline: AdapterPipeline, config: TrainConfig) -> dict[str, float]:
    """Gain recovered on answerable validation questions of each QA set, every phrasing (what a
    run is for; nanoGPT's estimate_loss), and the mean over the sets of each one's pooled gain
    as `gain` (`other_gain`: with another passage's adapter, the control). With
    `train_questions`, the same on the questions trained on, under `train/`."""
    generator = pipeline.generator
    was_training = generator.training
    generator.eval()
    evaluator = Evaluator(
        pipeline,
        EvalConfig(
            out_dir=config.out_dir,
            data_dir=config.data_dir,
            qa_examples=(config.eval_examples,),
            seed=config.seed,
        ),
    )
    scores: dict[str, float] = {}
    trained = [n for n, w in zip(QA_SETS, config.instruct_weights, strict=False) if w > 0]
    splits: list[tuple[str, str, int | None, Sequence[str]]] = [("", "validation", None, QA_SETS)]
    if config.train_questions is not None:
        splits.append(("train/", "train", config.train_questions, trained))
    for prefix, split, examples, names in splits:
        part: dict[str, float] = {}
        for name in names:
            result = evaluator.qa(name, split, examples)
            part |= {
                f"{name}/{k}": round(v, 3)
                for k, v in result.items()
                if k.endswith(("/gain", "answer_nll", "answerable"))
            }
        for key, cond in (("gain", "/all/adapter/gain"), ("other_gain", "/all/other_adapter/gain")):
            values = [v for k, v in part.items() if k.endswith(cond) and not math.isnan(v)]
            part[key] = sum(values) / len(values) if values else math.nan
        scores |= {prefix + k: v for k, v in part.items()}
    generator.train(was_training)
    return scores


def _lr_lambda(config: TrainConfig):  # noqa: ANN202 (a closure for LambdaLR)
    def scale(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return scale


def plot_losses(metrics_file: Path, png: Path, smooth: int = 20) -> None:
    """Loss curves per kind of step, smoothed by a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, (ax, val) = plt.subplots(1, 2, figsize=(12, 4))
    for key in ("completion", "reconstruction", "instruct", "distill"):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        spans = [values[max(0, i - smooth + 1) : i + 1] for i in range(len(values))]
        ax.plot(steps, [sum(s) / len(s) for s in spans], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    checks = [r for r in rows if r["kind"] == "validation"]
    for key, label in (("gain", "own adapter"), ("other_gain", "another passage's adapter")):
        val.plot([r["step"] for r in checks], [r[key] for r in checks], marker="o", label=label)
    val.set_xlabel("step")
    val.set_ylabel("validation gain recovered (%)")
    val.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
