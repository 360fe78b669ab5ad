"""Base model loading (offline, GGUF cached once) and the CLI's handling of bad input."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from genadapter.cli import build_parser, main, train_config
from generator import base_model
from generator.base_model import (
    BaseModel,
    BaseModelError,
    convert_gguf,
    converted_dir,
    default_gguf,
)
from generator.lora import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from generator.training.train import TrainConfig


@pytest.mark.slow
def test_gguf_conversion_is_cached(smollm2: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session fixture converted it once; a second conversion must not read GGUF again."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUF was loaded again")

    monkeypatch.setattr(base_model.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(base_model.AutoTokenizer, "from_pretrained", fail)
    folder = convert_gguf(default_gguf(), smollm2.name)
    assert folder == smollm2.path
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_gguf_converted_by_another_process_first_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first starts at once (server and CLI): the one that finishes second must not fail."""
    monkeypatch.setenv("GENADAPTER_CACHE", str(tmp_path / "cache"))
    replace = base_model.os.replace

    def other_process_wins(src: Path, dst: Path) -> None:
        if Path(dst).parent == tmp_path / "cache" / "models":  # the conversion's final rename
            Path(dst).mkdir()
            (Path(dst) / "config.json").write_text("{}")
        replace(src, dst)  # now fails: the folder exists and is not empty

    monkeypatch.setattr(base_model.os, "replace", other_process_wins)
    folder = convert_gguf(default_gguf(), "SmolLM2-135M-Instruct")
    assert (folder / "config.json").read_text() == "{}"  # the winner's folder, untouched
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left


def test_conversion_folder_keys_on_whole_seconds(tmp_path: Path) -> None:
    """An image's layers keep modification times in whole seconds: a container looks for the
    folder its build converted into; a file changed a second later is converted again."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    os.utime(gguf, ns=(0, 1_700_000_000_123_456_789))  # as the build's pip wrote it
    built = converted_dir(gguf, "m")
    os.utime(gguf, ns=(0, 1_700_000_000_000_000_000))  # as the image's layer restores it
    assert converted_dir(gguf, "m") == built
    os.utime(gguf, ns=(0, 1_700_000_001_000_000_000))
    assert converted_dir(gguf, "m") != built


def test_missing_model_names_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="nowhere"):
        base_model.resolve_model_dir(tmp_path / "nowhere")


def test_unreadable_gguf_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENADAPTER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(BaseModelError, match="could not read GGUF"):
        base_model.resolve_model_dir(bad)
    assert not list((tmp_path / "cache" / "models").glob("broken*"))  # nothing half-converted


@pytest.mark.parametrize("content", [b"", b"  \n\t", b"\xff\xfe\x00bad utf-8"])
def test_adapt_rejects_bad_context_files(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    context = tmp_path / "context.txt"
    context.write_bytes(content)
    out = tmp_path / "adapter"
    assert main(["adapt", str(context), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_adapt_missing_context_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapt", str(tmp_path / "none.txt"), "--out", str(tmp_path / "a")]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("adapt", "client", "serve", "train", "eval", "data", "bench"):
        assert command in help_text


def test_train_flags_override_only_what_they_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path), "--lr", "0.5", "--instruct-weights", "1", "0", "0"]
    )
    assert train_config(args) == TrainConfig(out_dir=tmp_path, lr=0.5, instruct_weights=[1, 0, 0])
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):  # every setting has a flag
        flag = "--out" if field.name == "out_dir" else "--" + field.name.replace("_", "-")
        assert flag in help_text


@pytest.mark.slow
def test_adapt_uses_the_shipped_trained_generator(
    smollm2: BaseModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    context = tmp_path / "context.txt"
    context.write_text("Velloran is the capital of Zorblat, a planet of purple oceans. " * 4)
    out = tmp_path / "adapter"
    assert main(["adapt", str(context), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adapter_id: ga-" in printed and "tokens: " in printed
    weights = load_file(out / PEFT_WEIGHTS_FILE)
    lora_b = [t for k, t in weights.items() if k.endswith("lora_B.weight")]
    assert len(lora_b) == smollm2.model.config.num_hidden_layers
    assert all(t.abs().max() > 0 for t in lora_b)  # trained: an untrained generator gives zeros
    assert json.loads((out / PEFT_CONFIG_FILE).read_text())["r"] == 16


def test_serve_switches_take_no_value_and_unset_ones_leave_the_environment() -> None:
    from genadapter.cli import settings_overrides

    on = settings_overrides(build_parser().parse_args(["serve", "--allow-insecure"]))
    off = settings_overrides(build_parser().parse_args(["serve", "--port", "9000"]))
    assert on == {"allow_insecure": True} and off == {"port": "9000"}
