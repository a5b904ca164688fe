"""Local path or Hub repository: a missing local path is named in one line and never sent to the
Hub; an ``owner/name`` id is announced before the Hub is contacted, and a Hub that cannot be
reached (offline, or no connection) is one line too. Offline throughout (conftest)."""

from __future__ import annotations

import importlib
import logging
import socket

import pytest

from saekit.cli import main
from saekit.hub import NotAvailableError, load
from saekit.hub.resolve import hub_repo_id

load_module = importlib.import_module(
    "saekit.hub.load"
)  # the module; saekit.hub.load is a function

# Each command that reads a dictionary source, with the other arguments it needs to get there.
COMMANDS = {
    "pull": lambda src: ["pull", src, "--output_dir", "out"],
    "eval": lambda src: ["eval", src],
    "export": lambda src: ["export", src, "--format", "saelens", "--output_dir", "out"],
    "steer": lambda src: ["steer", "some-model", "--saes", src, "--features", "1"],
}


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything would be looked up on the Hub."""

    def refuse(repo_id, *args):
        raise AssertionError(f"{repo_id} was sent to the Hub")

    monkeypatch.setattr(load_module, "_hub_folder", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_run_folder_under_an_existing_folder_is_a_local_path(
    command, tmp_path, monkeypatch, capsys, no_hub
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(COMMANDS[command]("runs/my-sea")) == 2
    line = _one_line_error(capsys)
    assert "runs/my-sea" in line and "runs/ is a folder here" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_file_name_is_not_a_repository(command, tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    assert main(COMMANDS[command]("pk/c.pt")) == 2
    line = _one_line_error(capsys)
    assert "pk/c.pt" in line and ".pt is a file" in line


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("a/b/c", "exactly one slash"),
        ("./owner/name", "no such path"),
        ("owner/na me", "characters"),
        ("owner/name--x", "characters"),
        ("owner/weights.safetensors", ".safetensors is a file"),
    ],
)
def test_only_owner_slash_name_can_be_a_repository(source, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotAvailableError, match=reason):
        hub_repo_id(source)


def test_repository_ids_with_dots_and_dashes_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_repo_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    (tmp_path / "meta-llama").mkdir()  # now it names a local folder's missing child
    with pytest.raises(NotAvailableError, match="meta-llama/ is a folder here"):
        hub_repo_id("meta-llama/Llama-3.1-8B")


def test_an_existing_file_is_named_as_a_file(tmp_path, no_hub):
    (tmp_path / "c.pt").write_bytes(b"x")
    with pytest.raises(NotAvailableError, match="is a file; give the folder"):
        load(tmp_path / "c.pt")


def test_offline_the_repository_is_announced_then_one_line_says_offline(
    tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="saekit.hub"):
        assert main(["pull", "owner/name", "--output_dir", "out"]) == 2
    assert "looking up the Hub repository owner/name" in caplog.text
    line = _one_line_error(capsys)
    assert "owner/name" in line and "HF_HUB_OFFLINE is set" in line


def test_a_hub_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch, capsys, caplog):
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nobody listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="saekit.hub"):
        assert main(["pull", "owner/name", "--output_dir", "out"]) == 2
    assert "looking up the Hub repository owner/name" in caplog.text
    line = _one_line_error(capsys)
    assert "could not reach the Hugging Face Hub to look up owner/name" in line
