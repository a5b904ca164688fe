"""The testbed's text-to-image pipeline end to end through the command line: cached with saekit's
diffusion adapter from prompts, a dictionary trained on its UNet mid block, `saekit eval
--testbed pipeline` and `saekit dashboard --testbed pipeline` on a saved pipeline folder
(random tiny weights; the shipped ones are the testbed's to check)."""

from __future__ import annotations

import json

import pytest
from steering_support import tiny_testbed_pipeline
from test_eval_support import (
    one_thread_module,  # noqa: F401 (a fixture)
)

from saekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from saekit.adapters.diffusion import DiffusionAdapter
    from saekit.cache import CacheConfig, InputConfig, cache_activations, open_inputs
    from saekit.testbed import models, world

    tmp = tmp_path_factory.mktemp("testbed-pipeline")
    pipe = tiny_testbed_pipeline()
    pipe.save_pretrained(tmp / "pipeline")
    prompts = [s.caption() for s in world.sample_scenes(12, seed=3, objects=1)]
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    data = InputConfig(prompts=str(tmp / "prompts.txt"))
    adapter = DiffusionAdapter(models.load_pipeline(tmp / "pipeline"), num_inference_steps=3)
    cfg = CacheConfig(
        hookpoints=["mid_block"],
        output_dir=str(tmp / "cache"),
        batch_size=6,
        dtype="float32",
        progress=False,
        rows_per_shard=512,
        shuffle_buffer_rows=1024,
        data=data,
        model_options={"num_inference_steps": 3},  # recorded: the dashboard remakes samples so
    )
    cache_activations(adapter, open_inputs(data), cfg)
    run = tmp / "run"
    code = main(
        ["train", "--cache", str(tmp / "cache"), "--hookpoint", "mid_block", "--k", "4",
         "--expansion_factor", "2", "--batch_size", "256", "--epochs", "2",
         "--checkpoint_every", "0", "--output_dir", str(run)]
    )  # fmt: skip
    assert code == 0
    return tmp, run


def test_eval_and_dashboard_on_the_testbed_pipeline(pipeline_run, capsys):
    tmp, run = pipeline_run
    assert main(
        ["eval", str(run), "--cache", str(tmp / "cache"), "--testbed", "pipeline",
         "--testbed_dir", str(tmp / "pipeline"), "--testbed_samples", "3", "--plots", "false"]
    ) == 0  # fmt: skip
    entry = next(
        iter(json.loads((run / "eval" / "eval.json").read_text())["dictionaries"].values())
    )
    downstream = entry["downstream"]["testbed_pipeline"]
    assert downstream["images"] == 3
    assert downstream["pixel_rmse"]["spliced_with_error"] == 0.0
    assert set(downstream["oracle_accuracy"]["clean"]) >= {"shape", "color", "position"}

    (folder,) = [p for p in run.iterdir() if (p / "cfg.json").is_file()]
    site = tmp / "site"
    assert main(
        ["dashboard", str(folder), "--cache", str(tmp / "cache"), "--testbed", "pipeline",
         "--testbed_dir", str(tmp / "pipeline"), "--steer_latents", "2", "--steer_seeds", "0", "1",
         "--steer_multipliers", "0", "4", "--top_k", "3", "--quantiles", "1", "--per_quantile", "2",
         "--max_pages", "4", "--output_dir", str(site)]
    ) == 0  # fmt: skip
    steered = sorted((site / "steer").iterdir())
    assert len(steered) == 2 and all(len(list(p.glob("*.png"))) == 4 for p in steered)
    thumbs = list((site / "thumbs").glob("*.png"))
    assert thumbs  # the prompts' samples, remade with the seeds they were cached with
    page = next((site / "latents").glob("*.html")).read_text()
    assert ("data-h=" in page and "a large" in page) or "a small" in page  # heatmap; the prompt
