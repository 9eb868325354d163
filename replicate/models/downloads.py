"""Pretrained weights' two download caches, each the one its library reads: a file found there,
else downloaded, verified and cached.

    replicate weights resnet18 convnext_tiny   # fill both caches ahead of time

- torchvision's ImageNet weights (the study's five): the torch hub cache,
  `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`), downloaded from
  https://download.pytorch.org/models/ or the mirror in `REPLICATE_WEIGHTS_URL`, and verified
  against the SHA-256 prefix torchvision writes in each file name (torch.hub's `check_hash`);
- timm models: the Hugging Face hub cache, `$HF_HOME/hub/` (default `~/.cache/huggingface/hub/`),
  downloaded from https://huggingface.co or the mirror in `HF_ENDPOINT`, and verified against the
  SHA-256 the hub names each stored file by.

`REPLICATE_OFFLINE=1` or `HF_HUB_OFFLINE=1`: never download. A download that fails, is cut off or
does not match its checksum leaves nothing in the cache, and says why in one line. A download's
progress bar is drawn only on a terminal. Which arch's weights come from where is `weights`'.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import socket
import ssl
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from .. import runtime
from ..errors import ReplicateError
from ..folders import sha256_file

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
                source, str(path), hash_prefix=hash_prefix(path), progress=runtime.on_terminal()
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
        path = Path(
            hf_hub_download(
                repo, filename, cache_dir=cache, endpoint=endpoint, tqdm_class=_hub_bar()
            )
        )
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


def _hub_bar():
    """hf_hub_download's `tqdm_class`: None (the hub's own bar) on a terminal, else a bar that draws
    nothing, so hub downloads follow the rule every bar here does (`runtime.on_terminal`)."""
    if runtime.on_terminal():
        return None
    from tqdm import tqdm

    return functools.partial(tqdm, disable=True)


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
