"""pull and push end to end through huggingface_hub's own client, against a local stand-in for the
Hub (the few routes the client calls, served on 127.0.0.1) with HF_ENDPOINT pointed at it.

No test needs the internet. The CLI tests run `python -m saekit` in a subprocess with the real
environment variables (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, HF_TOKEN); the API tests point the
already-imported client at the local endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
from safetensors.torch import save

import saekit
from saekit.dictionaries import (
    SAEConfig,
    build_dictionary,
    load_dictionary,
    save_dictionary,
    write_index,
)
from saekit.hub import NotAvailableError, load_pretrained

TOKEN = "hf_saekitTestToken0123456789abcdef"  # what a test token looks like; must never be written
D, M = 12, 36


# ----------------------------------------------------------------------------- the local Hub


class FakeHub:
    """In-memory repositories served over HTTP with the routes huggingface_hub calls: repo info,
    tree listing, file resolve (HEAD/GET), repo creation, README validation, preupload and commit.
    Every request is recorded, with whether it carried the expected token."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ repository state

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        parent = repo["branches"].get(branch)
        tree = dict(repo["commits"][parent]) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(repr((parent, sorted(tree.items()))).encode()).hexdigest()
        repo["commits"][sha] = tree
        repo["branches"][branch] = sha
        return sha

    def add_folder(self, repo_id: str, folder: Path, prefix: str = "") -> str:
        files = {
            f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.commit(repo_id, files)

    def tree(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["branches"][branch]]

    def downloads(self) -> list[str]:
        """Paths of the files that were fetched with GET."""
        return [
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for method, path, _ in self.requests
            if method == "GET" and "/resolve/" in path
        ]

    # ------------------------------------------------------------------ HTTP

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(request.path)
        path = unquote(url.path)
        authorised = request.headers.get("Authorization") == f"Bearer {self.token}"
        self.requests.append((method, path, authorised))
        body = b""
        if method == "POST":
            body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        try:
            status, headers, payload = self._route(
                method, path, parse_qs(url.query), body, authorised
            )
        except KeyError as err:
            status, headers, payload = 404, {"X-Error-Code": str(err.args[0])}, b"{}"
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(payload)

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        if repo_id not in self.repos:
            raise KeyError("RepoNotFound")
        repo = self.repos[repo_id]
        sha = repo["branches"].get(revision, revision)
        if sha not in repo["commits"]:
            raise KeyError("RevisionNotFound")
        return sha, repo["commits"][sha]

    def _route(self, method, path, query, body, authorised):
        as_json = {"Content-Type": "application/json"}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            sha, files = self._resolve(m[1], m[2])
            info = {
                "id": m[1],
                "sha": sha,
                "private": False,
                "siblings": [{"rfilename": f} for f in files],
            }
            return 200, as_json, json.dumps(info).encode()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            sha, files = self._resolve(m[1], m[2])
            prefix = f"{m[3]}/" if m[3] else ""
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries, folders = [], set()
            for name, data in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append(
                    {
                        "type": "file",
                        "oid": hashlib.sha1(data).hexdigest(),
                        "size": len(data),
                        "path": name,
                    }
                )
            if prefix and not entries and not folders:
                raise KeyError("EntryNotFound")
            entries += [{"type": "directory", "oid": "0" * 40, "path": f} for f in sorted(folders)]
            return 200, as_json, json.dumps(entries).encode()
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            sha, files = self._resolve(m[1], m[2])
            if m[3] not in files:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, b"{}"
            data = files[m[3]]
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, data
        if path == "/api/validate-yaml":
            return 200, as_json, b"{}"
        if not authorised:  # everything below writes
            return 401, {"X-Error-Code": "Unauthorized"}, b'{"error": "Invalid credentials"}'
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = (
                f"{request['organization']}/{request['name']}"
                if request.get("organization")
                else request["name"]
            )
            if repo_id in self.repos:
                return 409, as_json, b'{"error": "exists"}'
            self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"})
            return 200, as_json, json.dumps({"url": f"{self.url}/{repo_id}"}).encode()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            self._resolve(m[1], m[2])
            files = json.loads(body)["files"]
            answer = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return 200, as_json, json.dumps({"files": answer}).encode()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            self._resolve(m[1], m[2])
            added = {}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = self.commit(m[1], added, m[2])
            answer = {
                "commitUrl": f"{self.url}/{m[1]}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
            return 200, as_json, json.dumps(answer).encode()
        return 404, {}, b"{}"


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub(token=TOKEN)
    yield hub
    hub.close()


@pytest.fixture
def online(fake_hub, monkeypatch, tmp_path) -> Path:
    """Point the already-imported client at the local Hub, online, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return cache


def _saekit_cli(
    *args: str, hub: FakeHub | None, home: Path, offline: bool = False
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "TRANSFORMERS_OFFLINE": "1" if offline else "0",
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return subprocess.run(
        [sys.executable, "-m", "saekit", "--log-level", "DEBUG", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_token_nowhere(root: Path, *texts: str) -> None:
    assert all(TOKEN not in text for text in texts), "the token appeared in the output or log"
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), f"the token was written to {path}"


# ----------------------------------------------------------------------------- fixtures: repos


def _sparsify_files(
    hookpoints: list[str], seed: int = 0
) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Files of a sparsify-layout repository (cfg.json + sae.safetensors per hookpoint), as the
    sparsify package writes them (see test_formats_interop for the package itself)."""
    g = torch.Generator().manual_seed(seed)
    files, weights = {}, {}
    for hp in hookpoints:
        w = {
            "encoder.weight": torch.randn(M, D, generator=g),
            "encoder.bias": torch.randn(M, generator=g),
            "W_dec": torch.randn(M, D, generator=g),
            "b_dec": torch.randn(D, generator=g),
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": 32,
            "normalize_decoder": True,
            "num_latents": M,
            "k": 4,
        }
        files[f"{hp}/cfg.json"] = json.dumps({**cfg, "d_in": D}).encode()
        files[f"{hp}/sae.safetensors"] = save(w)
        weights[hp] = w
    return files, weights


def _reference_topk(w: dict, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    pre = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    vals, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals)


def _trained_run(root: Path) -> dict:
    """A saekit output folder with two dictionaries, training and eval records."""
    saes = {}
    for name, arch in (
        ("vision_model.encoder.layers.3", "topk"),
        ("vision_model.encoder.layers.5", "jumprelu"),
    ):
        cfg = SAEConfig(
            architecture=arch,
            d_sae=M,
            k=4,
            hookpoint=name,
            model="tiny/clip",
            model_revision="abc123",
            capture="output",
        ).resolved(D)
        sae = build_dictionary(cfg)
        with torch.no_grad():
            sae.b_enc.normal_()
        save_dictionary(
            sae,
            root / name,
            training={"train": {"lr": 0.0002, "batch_size": 4096}, "steps": 100, "tokens": 409600},
            metrics={"fvu": 0.125, "l0": 4.0},
        )
        saes[name] = sae
    write_index(root, {n: s.cfg for n, s in saes.items()})
    (root / "run.json").write_text(
        json.dumps({"config": {"data": {"cache": "runs/cache", "shuffle": True}}})
    )
    (root / "vision_model.encoder.layers.3" / "eval.json").write_text(
        json.dumps({"explained_variance": 0.875})
    )
    return saes


# ----------------------------------------------------------------------------- pull


def test_pull_fetches_only_the_dictionary_then_works_offline_from_the_cache(tmp_path, fake_hub):
    files, weights = _sparsify_files(["layers.0", "layers.1"])
    files["checkpoints/huge.bin"] = b"x" * 4096  # must not be downloaded
    sha = fake_hub.commit("someone/sparse-dicts", files)
    home = tmp_path / "home"

    done = _saekit_cli(
        "pull",
        "someone/sparse-dicts",
        "--hookpoint",
        "layers.1",
        "--output_dir",
        str(tmp_path / "out"),
        hub=fake_hub,
        home=home,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(fake_hub.downloads()) == ["layers.1/cfg.json", "layers.1/sae.safetensors"]
    assert all(
        auth for method, _, auth in fake_hub.requests
    )  # the client sent the token from HF_TOKEN
    sae = load_dictionary(tmp_path / "out" / "layers.1")
    assert sae.cfg.hookpoint == "layers.1"
    x = torch.randn(32, D)
    torch.testing.assert_close(
        sae.encode_dense(x), _reference_topk(weights["layers.1"], x), rtol=1e-5, atol=1e-5
    )
    imported = json.loads((tmp_path / "out" / "layers.1" / "cfg.json").read_text())["training"][
        "imported"
    ]
    assert imported["repo_id"] == "someone/sparse-dicts" and imported["revision"] == sha
    assert imported["format"] == "sparsify"
    assert (
        json.loads((tmp_path / "out" / "index.json").read_text())["dictionaries"][0]["path"]
        == "layers.1"
    )

    # offline, from the cache alone: the Hub is gone
    fake_hub.close()
    again = _saekit_cli(
        "pull",
        "someone/sparse-dicts",
        "--hookpoint",
        "layers.1",
        "--output_dir",
        str(tmp_path / "again"),
        hub=fake_hub,
        home=home,
        offline=True,
    )
    assert again.returncode == 0, again.stderr
    torch.testing.assert_close(load_dictionary(tmp_path / "again" / "layers.1").W_dec, sae.W_dec)
    # a dictionary that was never downloaded: the message names the repo, the file and what to do
    missing = _saekit_cli(
        "pull",
        "someone/sparse-dicts",
        "--hookpoint",
        "layers.0",
        "--output_dir",
        str(tmp_path / "x"),
        hub=fake_hub,
        home=home,
        offline=True,
    )
    assert missing.returncode == 2
    message = missing.stderr.strip().splitlines()[-1]
    assert "someone/sparse-dicts" in message and "layers.0" in message
    assert "HF_HUB_OFFLINE" in message and "network access" in message
    _assert_token_nowhere(tmp_path, done.stdout, done.stderr, again.stderr, missing.stderr)


def test_load_from_the_hub_with_revision_and_subfolder(online, fake_hub):
    first, w_first = _sparsify_files(["layers.0"], seed=1)
    fake_hub.commit("org/dicts", {f"v1/{k}": v for k, v in first.items()})
    old = fake_hub.repos["org/dicts"]["branches"]["main"]
    second, w_second = _sparsify_files(["layers.0"], seed=2)
    fake_hub.commit("org/dicts", {f"v1/{k}": v for k, v in second.items()})
    x = torch.randn(16, D)
    latest = load_pretrained("org/dicts", "layers.0", subfolder="v1", cache_dir=online)
    pinned = load_pretrained(
        "org/dicts", "layers.0", subfolder="v1", revision=old, cache_dir=online
    )
    torch.testing.assert_close(
        latest.sae.encode_dense(x), _reference_topk(w_second["layers.0"], x), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        pinned.sae.encode_dense(x), _reference_topk(w_first["layers.0"], x), rtol=1e-5, atol=1e-5
    )
    assert pinned.origin.revision == old and latest.origin.path == "v1/layers.0"


def test_offline_a_file_missing_from_the_cache_is_named(online, fake_hub, monkeypatch):
    from huggingface_hub import constants, hf_hub_download

    files, _ = _sparsify_files(["layers.0"])
    fake_hub.commit("org/dicts", files)
    hf_hub_download("org/dicts", "cfg.json", subfolder="layers.0", cache_dir=online)  # config only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotAvailableError) as err:
        saekit.load("org/dicts", "layers.0", cache_dir=online)
    message = str(err.value)
    assert "file layers.0/sae.safetensors" in message and "org/dicts" in message
    assert "HF_HUB_OFFLINE is set" in message and "with network access" in message


def test_hub_errors_say_what_is_missing(online, fake_hub):
    files, _ = _sparsify_files(["layers.0", "layers.1"])
    fake_hub.commit("org/dicts", files)
    with pytest.raises(NotAvailableError, match="no model repository org/nothing"):
        saekit.load("org/nothing", "layers.0", cache_dir=online)
    with pytest.raises(NotAvailableError, match="has no revision 'v9'"):
        saekit.load("org/dicts", "layers.0", revision="v9", cache_dir=online)
    with pytest.raises(NotAvailableError, match=r"has no layers\.7"):
        saekit.load("org/dicts", "layers.7", cache_dir=online)
    with pytest.raises(
        saekit.hub.FormatError, match=r"pick one with hookpoint=.*layers\.0, layers\.1"
    ):
        saekit.load("org/dicts", cache_dir=online)


def test_a_file_far_larger_than_its_config_is_refused_before_download(online, fake_hub):
    files, _ = _sparsify_files(["layers.0"])
    files["layers.0/sae.safetensors"] += b"\0" * (11 * 2**20)  # 10 MiB of slack, and then some
    fake_hub.commit("org/bloated", files)
    with pytest.raises(saekit.hub.UnsafeInputError, match="far more than its config implies"):
        saekit.load("org/bloated", "layers.0", cache_dir=online)
    assert fake_hub.downloads() == ["layers.0/cfg.json"]


def test_pulling_a_release_names_the_model_hookpoint_and_capture(online, fake_hub, tmp_path):
    # The registry's SAeUron release, served by the local Hub with a tiny dictionary in its layout.
    files, _ = _sparsify_files(["unet.up_blocks.1.attentions.1"])
    fake_hub.commit("bcywinski/SAeUron", files)
    from saekit.hub.pull import pull

    pulled = pull(
        "saeuron-unlearncanvas",
        "up_blocks.1.attentions.1",
        output_dir=tmp_path / "dicts",
        cache_dir=online,
    )
    release = saekit.hub.releases()["saeuron-unlearncanvas"]
    sae = load_dictionary(pulled.path)
    assert pulled.path == tmp_path / "dicts" / "up_blocks.1.attentions.1"
    assert (sae.cfg.model, sae.cfg.hookpoint, sae.cfg.capture) == (
        release.model,
        "up_blocks.1.attentions.1",
        "output",
    )
    assert pulled.origin.release == "saeuron-unlearncanvas"
    # a release that states the width refuses files of another width
    fake_hub.commit(
        "surokpro2/sdxl-saes",
        {
            f"unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001/final/{k.split('/')[-1]}": v
            for k, v in files.items()
        },
    )
    with pytest.raises(saekit.hub.FormatError, match="expects d_in=1280"):
        saekit.load(
            "sdxl-turbo-unbox", "mid_block.attentions.0", format="sparsify", cache_dir=online
        )


# ----------------------------------------------------------------------------- push


def test_push_uploads_exactly_what_the_dry_run_writes_and_pulls_back(tmp_path, fake_hub):
    saes = _trained_run(tmp_path / "run")
    home = tmp_path / "home"
    dry = _saekit_cli(
        "push",
        str(tmp_path / "run"),
        "me/clip-saes",
        "--dry_run",
        str(tmp_path / "dry"),
        hub=fake_hub,
        home=home,
    )
    assert dry.returncode == 0, dry.stderr
    assert not fake_hub.repos  # nothing was uploaded
    staged = {
        p.relative_to(tmp_path / "dry").as_posix(): p.read_bytes()
        for p in (tmp_path / "dry").rglob("*")
        if p.is_file()
    }
    assert sorted(staged) == [
        "README.md",
        "index.json",
        "vision_model.encoder.layers.3/cfg.json",
        "vision_model.encoder.layers.3/eval.json",
        "vision_model.encoder.layers.3/sae.safetensors",
        "vision_model.encoder.layers.5/cfg.json",
        "vision_model.encoder.layers.5/sae.safetensors",
    ]
    card = staged["README.md"].decode()
    assert card.startswith("---\nlibrary_name: saekit\n")
    for text in (
        "tiny/clip",
        "abc123",
        "`vision_model.encoder.layers.5`",
        "the module's output",
        "runs/cache",
        "explained_variance",
        "0.875",
        "lr: 0.0002",
    ):
        assert text in card, text

    done = _saekit_cli("push", str(tmp_path / "run"), "me/clip-saes", hub=fake_hub, home=home)
    assert done.returncode == 0, done.stderr
    uploaded = {k: v for k, v in fake_hub.tree("me/clip-saes").items() if k != ".gitattributes"}
    assert uploaded == staged  # the same files, byte for byte

    back = _saekit_cli(
        "pull",
        "me/clip-saes",
        "--hookpoint",
        "vision_model.encoder.layers.5",
        "--output_dir",
        str(tmp_path / "back"),
        hub=fake_hub,
        home=home,
    )
    assert back.returncode == 0, back.stderr
    x = torch.randn(8, D)
    pulled = load_dictionary(tmp_path / "back" / "vision_model.encoder.layers.5")
    torch.testing.assert_close(pulled(x), saes["vision_model.encoder.layers.5"](x))
    assert pulled.cfg.model == "tiny/clip"
    _assert_token_nowhere(
        tmp_path, dry.stdout, dry.stderr, done.stdout, done.stderr, back.stdout, back.stderr
    )


def test_push_without_a_valid_token_is_refused_with_advice(tmp_path, fake_hub, monkeypatch):
    _trained_run(tmp_path / "run")
    fake_hub.token = "a-different-token"
    done = _saekit_cli(
        "push", str(tmp_path / "run"), "me/clip-saes", hub=fake_hub, home=tmp_path / "home"
    )
    assert done.returncode == 2
    assert "HTTP 401" in done.stderr and "HF_TOKEN" in done.stderr
    assert not fake_hub.repos


def test_push_refuses_a_broken_dictionary_before_staging_anything(tmp_path, fake_hub):
    _trained_run(tmp_path / "run")
    weights = tmp_path / "run" / "vision_model.encoder.layers.5" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    from saekit.hub.push import push

    with pytest.raises(saekit.hub.FormatError, match=r"refusing to publish.*truncated"):
        push(tmp_path / "run", "me/clip-saes", dry_run=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()


def test_a_second_load_reads_the_cache(online, fake_hub):
    files, _ = _sparsify_files(["layers.0"])
    fake_hub.commit("org/dicts", files)
    first = saekit.load("org/dicts", "layers.0", cache_dir=online)
    second = saekit.load("org/dicts", "layers.0", cache_dir=online)
    assert sorted(fake_hub.downloads()) == ["layers.0/cfg.json", "layers.0/sae.safetensors"]  # once
    torch.testing.assert_close(first.W_dec, second.W_dec)
