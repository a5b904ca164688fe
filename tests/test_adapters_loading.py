"""Loading models by hub id or path: the family is recognised from the folder's files, offline
mode and ``local_files_only`` are honoured, a missing model names what was looked for and
where, ``trust_remote_code`` stays off unless turned on, and a cache refuses a model whose
weights changed."""

from __future__ import annotations

import json

import pytest
import torch
from adapters_support import clip_tokenizer, images, one_thread, tiny_clip, tiny_llama

from saekit.adapters import adapter_for, detect_adapter, load_adapter
from saekit.adapters.clip import CLIPAdapter
from saekit.adapters.diffusion import DiffusionAdapter
from saekit.adapters.loading import ModelNotFoundError, from_pretrained, hub_cache_dir
from saekit.adapters.transformers_lm import TransformersAdapter
from saekit.cache import CacheConfig, CacheError, cache_activations
from saekit.cli import main
from saekit.configuration import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_text(json.dumps(content))
    return str(folder)


def test_the_family_is_recognised_from_the_folder(tmp_path):
    cases = {
        "clip": {"config.json": {"model_type": "clip"}},
        "siglip": {"config.json": {"model_type": "siglip_vision_model"}},
        "llava": {"config.json": {"model_type": "llava"}},
        "bert": {"config.json": {"model_type": "bert"}},
        "pipeline": {"model_index.json": {"_class_name": "StableDiffusionPipeline"}},
        "openclip": {"open_clip_config.json": {"model_cfg": {}}},
    }
    expected = {
        "clip": "clip",
        "siglip": "clip",
        "llava": "vlm",
        "bert": "transformers",
        "pipeline": "diffusion",
        "openclip": "open_clip",
    }
    for name, files in cases.items():
        assert detect_adapter(_folder(tmp_path, name, files)) == expected[name], name
    assert detect_adapter("open_clip:ViT-B-32@openai") == "open_clip"
    assert detect_adapter("my_project.models:build") == "custom"
    unet = _folder(tmp_path, "unet", {"config.json": {"_class_name": "UNet2DConditionModel"}})
    with pytest.raises(ConfigError, match="whole pipeline"):
        detect_adapter(unet)
    with pytest.raises(ConfigError, match="no adapter recognises the folder"):
        detect_adapter(_folder(tmp_path, "empty", {}))


def test_a_missing_model_names_what_was_looked_for_and_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # HF_HUB_OFFLINE=1 in the tests: the Hub is never asked.
    for load in (
        lambda: load_adapter("nobody/no-such-model"),
        lambda: CLIPAdapter.load("nobody/no-such-model"),
        lambda: DiffusionAdapter.load("nobody/no-such-model"),
        lambda: TransformersAdapter.load("nobody/no-such-model"),
    ):
        with pytest.raises(ModelNotFoundError) as info:
            load()
        message = str(info.value)
        assert "'nobody/no-such-model'" in message
        assert str(tmp_path / "nobody" / "no-such-model") in message  # the local folder tried
        assert hub_cache_dir() in message and "offline mode is on" in message
    with pytest.raises(ModelNotFoundError, match=r"no model folder at .*/models/clip"):
        load_adapter("./models/clip")
    # open_clip: a pretrained tag whose weights are not in the cache
    with pytest.raises(ModelNotFoundError) as info:
        load_adapter("open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert "'ViT-B-32' with pretrained='laion2b_s34b_b79k'" in str(info.value)
    assert hub_cache_dir() in str(info.value) and "nothing was downloaded" in str(info.value)
    # The CLI shows it as one line, no traceback.
    (tmp_path / "p.txt").write_text("a prompt\n")
    code = main(
        ["cache", "--model", "nobody/no-such-model", "--hookpoints", "x", "--prompts", "p.txt"]
    )
    assert code != 0


def test_offline_mode_and_local_files_only_reach_from_pretrained(monkeypatch):
    seen = {}

    def loader(spec, **kwargs):
        seen.update(kwargs)
        return "loaded"

    assert from_pretrained(loader, "org/model", what="model") == "loaded"
    assert seen["local_files_only"] is True  # HF_HUB_OFFLINE=1 (tests/conftest.py)
    assert "trust_remote_code" not in seen  # never added by saekit
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    from_pretrained(loader, "org/model", what="model")
    assert seen["local_files_only"] is False
    from_pretrained(loader, "org/model", what="model", local_files_only=True)
    assert seen["local_files_only"] is True


def test_remote_code_is_not_run_unless_turned_on(tmp_path):
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "saekit_remote_test",
                "architectures": ["RemoteModel"],
                "auto_map": {
                    "AutoConfig": "configuration_remote.RemoteConfig",
                    "AutoModel": "modeling_remote.RemoteModel",
                },
            }
        )
    )
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_remote.py").write_text(code)
    (folder / "modeling_remote.py").write_text(code)
    with pytest.raises(ConfigError, match="--trust_remote_code"):
        load_adapter(str(folder))
    config = tmp_path / "cache.yaml"
    config.write_text(f"model: {folder}\nhookpoints: [x]\ndata:\n  prompts: {config}\n")
    assert main(["cache", "--config", str(config)]) != 0
    assert not marker.exists()


def test_in_memory_models_are_wrapped_by_family_and_identified_by_their_weights(tmp_path):
    model, tokenizer = tiny_clip(), clip_tokenizer()
    adapter = adapter_for((model, tokenizer))
    assert isinstance(adapter, CLIPAdapter) and adapter.tokenizer is tokenizer
    assert isinstance(adapter_for(tiny_llama()), TransformersAdapter)
    with pytest.raises(TypeError, match="no adapter"):
        adapter_for(object())

    from saekit.cache import ImageFolder

    for i, image in enumerate(images(4)):
        (tmp_path / "images").mkdir(exist_ok=True)
        image.save(tmp_path / "images" / f"{i}.png")
    cfg = CacheConfig(
        hookpoints=["vision_model.encoder.layers.0"],
        output_dir=str(tmp_path / "cache"),
        rows_per_shard=64,
        shuffle_buffer_rows=64,
        progress=False,
    )
    cache_activations(adapter, ImageFolder(tmp_path / "images"), cfg)
    with torch.no_grad():
        model.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.01)
    with pytest.raises(CacheError, match="model_identity"):
        cache_activations(adapter, ImageFolder(tmp_path / "images"), cfg)


def test_the_cli_passes_the_loading_switches_and_model_options(tmp_path, monkeypatch):
    seen = {}

    class _Stop(Exception):
        pass

    def fake_load_adapter(model, adapter, **kwargs):
        seen.update(kwargs, model=model)
        raise _Stop

    monkeypatch.setattr("saekit.adapters.load_adapter", fake_load_adapter)
    (tmp_path / "p.txt").write_text("a prompt\n")
    with pytest.raises(_Stop):
        main(
            [
                "cache",
                "--model",
                "org/model",
                "--hookpoints",
                "x",
                "--prompts",
                str(tmp_path / "p.txt"),
                "--trust_remote_code",
                "true",
                "--local_files_only",
                "true",
                "--model_options",
                "{num_inference_steps: 4, seed: 2}",
            ]
        )
    assert seen["trust_remote_code"] is True and seen["local_files_only"] is True
    assert seen["num_inference_steps"] == 4 and seen["seed"] == 2
