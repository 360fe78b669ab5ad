"""`genadapter client ...`: commands that drive a running server through the typed client.

They import neither torch nor the server, and parse their own arguments (the full parser imports
the generator for `train`'s choices), so they start at once, also where only the client is
installed. Answers go to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from clients import GenerativeAdapterClient, GenerativeAdapterError
from clients.wire import API_KEY_ENV, DEFAULT_URL, URL_ENV

Command = Callable[[GenerativeAdapterClient, argparse.Namespace], None]
EXIT = "/exit"
TICK_S = 0.2  # how often the elapsed time of an adapt is redrawn


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from e


@contextlib.contextmanager
def elapsed(label: str, out: TextIO) -> Iterator[None]:
    """Redraws `label` and the seconds spent on one terminal line while the block runs (a long
    context takes minutes to adapt on a CPU); nothing where `out` is not a terminal."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(TICK_S):
            out.write(f"\r{label} {time.monotonic() - start:.1f} s")
            out.flush()

    ticker = threading.Thread(target=tick, daemon=True)
    if out.isatty():
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker.is_alive():
            ticker.join()
            out.write("\r\033[K")  # the line is cleared for what follows


def cmd_adapt(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    """One file is a context; several are documents read in order, all in one adapter."""
    texts = [read_text(path) for path in args.files]
    label = f"adapting {sum(map(len, texts)):,} characters..."
    with elapsed(label, sys.stderr):
        if len(texts) == 1:
            made = client.adapt(texts[0], parent=args.parent)
        else:
            made = client.adapt(documents=texts, parent=args.parent)
    how = "cached" if made.cached else f"made in {made.seconds:.1f} s"
    print(f"{made.tokens} tokens, {how}", file=sys.stderr)
    print(made.adapter_id)


def answer(
    client: GenerativeAdapterClient, args: argparse.Namespace, history: list[dict[str, str]]
) -> str:
    """Streams the reply to `history` to stdout as it comes; returns it whole."""
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    given = {k: v for k, v in sampling.items() if v is not None}
    chunks = client.stream_chat(args.model, history, **given)
    parts = []
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
    print()
    return "".join(parts)


def cmd_ask(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    answer(client, args, [{"role": "user", "content": args.question}])


def cmd_chat(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    """Questions from the terminal, answers streamed; the whole history goes with each question
    (the adapter holds the document, the history the conversation). Ctrl-C stops an answer."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() gets line editing and history where it exists)
    if args.model not in {m.id for m in client.models().data}:
        raise ValueError(
            f"{args.model} is not a model of this server: see `genadapter client adapters`"
        )
    print(f"chatting with {args.model}; {EXIT} or Ctrl-D to leave", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            question = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if question.strip() == EXIT:
            return
        if not question.strip():
            continue
        history.append({"role": "user", "content": question})
        try:
            history.append({"role": "assistant", "content": answer(client, args, history)})
        except KeyboardInterrupt:
            history.pop()  # the question without its answer is forgotten
            print("\n(stopped)", file=sys.stderr)


def cmd_adapters(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    for card in client.adapters():
        created = datetime.fromtimestamp(card.created, timezone.utc)
        print(f"{card.id}\t{created:%Y-%m-%d %H:%M:%S} UTC")


def cmd_show(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    print(client.info(args.adapter_id).model_dump_json(indent=2))


def cmd_delete(client: GenerativeAdapterClient, args: argparse.Namespace) -> None:
    client.delete(args.adapter_id)
    print(f"deleted {args.adapter_id}", file=sys.stderr)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The client's subcommands; each takes the server's --url and --api-key."""
    server = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after `adapters`' action, neither default hides the other
    server.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the server (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    server.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help=f"its API key, if it has keys (default: ${API_KEY_ENV})",
    )
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, help="longest answer (default: the server's)")
    sampling.add_argument("--temperature", type=float, help="0: greedy (default: the model's)")
    model = "an adapter id (or the base model's name)"
    sub = parser.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Command, text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[server, *parents], help=text, description=text)
        p.set_defaults(run=run)
        return p

    p = command("adapt", cmd_adapt, "turn text files into an adapter on the server; prints its id")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text")
    p.add_argument("--parent", help="extend this adapter with the text")
    p = command("ask", cmd_ask, "ask one question, the answer streamed", sampling)
    p.add_argument("model", metavar="ADAPTER_ID", help=model)
    p.add_argument("question")
    p = command("chat", cmd_chat, "a conversation in the terminal, answers streamed", sampling)
    p.add_argument("model", metavar="ADAPTER_ID", help=model)
    p = command("adapters", cmd_adapters, "list the adapters (show ID, delete ID)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, run, text in (
        ("list", cmd_adapters, "list the adapters (the default)"),
        ("show", cmd_show, "an adapter's metadata, as JSON"),
        ("delete", cmd_delete, "delete an adapter"),
    ):
        action = actions.add_parser(name, parents=[server], help=text, description=text)
        action.set_defaults(run=run)
        if name != "list":
            action.add_argument("adapter_id", metavar="ID")


def one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):  # an argument the request refuses, as the server says it
        return "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
    return str(e)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="genadapter client",
        description=f"Drive a running server (--url, ${URL_ENV}, else {DEFAULT_URL}).",
    )
    add_commands(parser)
    args = parser.parse_args(argv)
    try:
        url, key = getattr(args, "url", None), getattr(args, "api_key", None)
        with GenerativeAdapterClient(url, api_key=key) as client:
            args.run(client, args)
    except (GenerativeAdapterError, OSError, ValueError) as e:
        print(f"genadapter client {args.client_command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
