"""`saekit eval` end to end: train on a cache, evaluate the run with factor labels, read the
report and figures; a perfect dictionary reports FVU 0 and loss recovered 1; the report feeds
`saekit push`'s model card; bad input is one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval_metrics import _one_hot_cache
from test_eval_support import (
    identity_dictionary,
    one_thread_module,  # noqa: F401 (a fixture)
)

from saekit.cli import main
from saekit.dictionaries import save_dictionary, write_index
from saekit.evaluation import FactorLabels, read_report, write_labels

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def labelled_cache(tmp_path):
    cache, ids = _one_hot_cache(tmp_path, n=96, vocab=8)
    presence = torch.zeros(len(ids), 8, dtype=torch.bool)
    presence[torch.arange(len(ids))[:, None], ids] = True
    labels = write_labels(
        tmp_path / "labels.json", FactorLabels([f"token={i}" for i in range(8)], presence)
    )
    np.save(tmp_path / "ids.npy", ids.numpy())
    return cache, labels, tmp_path / "ids.npy"


def test_eval_a_trained_run(tmp_path, labelled_cache, monkeypatch, capsys):
    cache, labels, _ = labelled_cache
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--cache",
                str(cache),
                "--hookpoint",
                "embed",
                "--k",
                "2",
                "--expansion_factor",
                "2",
                "--batch_size",
                "64",
                "--epochs",
                "3",
                "--log_every",
                "2",
                "--checkpoint_every",
                "0",
                "--output_dir",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--cache", str(cache), "--labels", str(labels)]) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "factor values with AUROC >= 0.95" in printed

    report = read_report(run / "eval" / "eval.json")
    (name,) = report["dictionaries"]
    entry = report["dictionaries"][name]
    assert entry["dictionary"]["hookpoint"] == "embed" and entry["dictionary"]["d_sae"] == 16
    assert entry["data"]["rows"] == 96 * 6
    rec = entry["reconstruction"]
    assert 0 <= rec["fvu"] < 1 and rec["l0"] <= 2 and len(rec["density_histogram"]["counts"]) > 0
    assert entry["factors"]["values_total"] == 8 and "token=3" in entry["factors"]["per_value"]
    assert sorted(entry["figures"]) == sorted(
        [f"{name}.density.png", f"{name}.factors.png", f"{name}.training.png"]
    )
    for figure in entry["figures"]:
        assert (run / "eval" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "eval" / f"{name}.factors.safetensors").is_file()

    # the report's metrics reach the model card of a push
    staged = tmp_path / "staged"
    assert (
        main(
            [
                "push",
                str(run),
                "me/onehot",
                "--dry_run",
                str(staged),
                "--eval_report",
                str(run / "eval" / "eval.json"),
            ]
        )
        == 0
    )
    card = (staged / "README.md").read_text()
    assert "reconstruction.fvu" in card


def test_eval_perfect_dictionary_with_next_token_downstream(
    tmp_path, labelled_cache, monkeypatch, capsys
):
    cache, _, ids = labelled_cache
    folder = tmp_path / "perfect" / "embed"
    sae = identity_dictionary(8, hookpoint="embed")
    save_dictionary(sae, folder)
    write_index(tmp_path / "perfect", {"embed": sae.cfg})
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            str(tmp_path / "perfect"),
            "--cache",
            str(cache),
            "--model",
            "test_eval_support:one_hot_tokens",
            "--adapter",
            "custom",
            "--tensors",
            str(ids),
            "--samples",
            "40",
            "--output_dir",
            str(out),
            "--plots",
            "false",
        ]
    )
    assert code == 0
    entry = json.loads((out / "eval.json").read_text())["dictionaries"]["embed"]
    assert entry["reconstruction"]["fvu"] == 0.0
    next_token = entry["downstream"]["next_token"]
    assert next_token["tokens"] == 40 * 5
    assert next_token["loss"]["spliced"] == pytest.approx(next_token["loss"]["clean"], abs=1e-6)
    assert next_token["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert entry["figures"] == []


def test_eval_errors_are_one_line(tmp_path, labelled_cache, capsys):
    cache, _, _ = labelled_cache
    folder = tmp_path / "d"
    save_dictionary(identity_dictionary(8, hookpoint="embed"), folder)
    assert main(["eval", str(folder)]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
    assert main(["eval", str(folder), "--labels", "x.json"]) == 2
    assert "give --cache too" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--cache", str(cache)]) == 2
    assert "error" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    save_dictionary(identity_dictionary(5, hookpoint="embed"), wrong)
    assert main(["eval", str(wrong), "--cache", str(cache)]) == 2
    assert "has width 8 but the dictionary reads d_in=5" in capsys.readouterr().err
    (tmp_path / "labels.json").write_text("{}")
    assert (
        main(
            ["eval", str(folder), "--cache", str(cache), "--labels", str(tmp_path / "labels.json")]
        )
        == 2
    )
    assert "must be a JSON object with 'value_names'" in capsys.readouterr().err
