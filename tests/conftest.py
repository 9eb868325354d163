"""Shared fixtures: tiny image folders made in the test, and the real Houses zip when present.

python -m pytest
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

HOUSES_ZIP = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "houses-dataset-400.zip"
)
COLORS = {"blue": (40, 60, 200), "red": (200, 50, 40)}


def make_image(
    path: Path, color=(128, 128, 128), size=(48, 40), seed: int = 0, fmt: str = "JPEG"
) -> Path:
    """A small noisy image of one dominant colour, so classes are learnable but not trivial."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(
        "uint8"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def make_task(root: Path, n_train: int = 4, n_valid: int = 2, classes=COLORS) -> Path:
    """root/{train,valid}/<class>/*.jpg with coloured noise images; returns root."""
    seed = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        for name, color in classes.items():
            for i in range(n):
                seed += 1
                make_image(root / split / name / f"{name}_{i}.jpg", color, seed=seed)
    return root


def make_houses_zip(path: Path, n_houses: int = 10, extra: dict[str, bytes] | None = None) -> Path:
    """A miniature Houses Dataset archive in the real one's layout."""
    with zipfile.ZipFile(path, "w") as zf:
        for house in range(1, n_houses + 1):
            for j, room in enumerate(("bathroom", "bedroom", "kitchen", "frontal")):
                # Noise, not a flat colour: every photo distinct, as the audit's hashes see them.
                rng = np.random.default_rng(house * 10 + j)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
                zf.writestr(
                    f"Houses-dataset-master/Houses Dataset/{house}_{room}.jpg", buf.getvalue()
                )
        zf.writestr(
            "Houses-dataset-master/Houses Dataset/HousesInfo.txt", "4 4 4053 85255 869500\n"
        )
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


# The suite runs in worker processes, one per core, each taking whole test files (pytest-xdist,
# --dist loadfile in pyproject.toml): most session fixtures below are built in each worker that
# uses them, so each one's users live in as few files as can be (zoo: test_archs.py; houses:
# test_houses.py; grid: test_compare.py, and the browser's look at its page); the trained runs
# several files need are trained once for all workers (`trained_once`).

# The files that take longest, longest first (seconds on 2 cores, from --junitxml): xdist hands
# files out in collection order (--no-loadscope-reorder), so the long ones start first and the
# short ones fill the workers' ends, instead of one worker finishing a long file alone. Only the
# balance depends on it: a file missing here runs after these.
SLOWEST_FIRST = [
    "test_shared_body.py",  # 90: the README's tour
    "test_archs.py",  # 82
    "test_index.py",  # 57
    "test_transfer.py",  # 55
    "test_compare.py",  # 50
    "test_distributed.py",  # 45
    "test_browser.py",  # 41
    "test_models.py",  # 37
    "test_houses.py",  # 30
    "test_serve.py",  # 28
    "test_audit.py",  # 23
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


def pytest_configure(config):
    """One PyTorch thread per core and worker: two workers with two threads each on two cores
    oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session", autouse=True)
def no_onnx_unless_asked():
    """Runs started from the command line skip model.onnx (REPLICATE_ONNX=0; runs made with RunConfig
    write it unless given onnx=False): the export takes 3-15 s a run, and only the tests that open a
    model.onnx need one; those pass --onnx. Subprocesses (accelerate launch) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLICATE_ONNX", "0")
        yield


@pytest.fixture
def tiny_task(tmp_path) -> Path:
    """data/toy with 2 classes x (4 train + 2 valid) images; returns the data folder."""
    make_task(tmp_path / "data" / "toy")
    return tmp_path / "data"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and no downloads: what a fresh offline machine looks like."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("REPLICATE_OFFLINE", "1")
    return tmp_path / "torch-home"


requires_houses = pytest.mark.skipif(
    not HOUSES_ZIP.is_file(),
    reason=f"the Houses zip is not at {HOUSES_ZIP} (../shared beside the repo)",
)


def odd_photos(folder: Path) -> Path:
    """Everything a listing site receives: modes, depths, sizes, rotations and files that are not photos."""
    make_image(folder / "good.jpg", (200, 60, 40))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo")
    good = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("L", (50, 40), 128).save(folder / "gray.png")
    Image.new("CMYK", (50, 40), (0, 50, 100, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (50, 40), (10, 200, 10, 100)).save(folder / "alpha.png")
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).save(
        folder / "sixteen.png"
    )
    Image.new("RGB", (6000, 4000), (90, 90, 200)).save(folder / "huge.jpg", quality=50)
    return folder


def synthetic_photo(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like image: a colour gradient with random boxes and ellipses and a camera's grain,
    different for every seed (perceptual hashes need structure; noise or a flat colour alone would
    not behave like a photo, and without grain a flat edge would look like padding to the audit)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h)[
        :, None, None
    ] * rng.uniform(0, 0.7)
    image = Image.fromarray(np.clip(a + (b - a) * ramp, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    grain = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(
        np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype("uint8")
    )


# --- one trained grid, shared -------------------------------------------------------------------

ROOMS = {"bathroom": (30, 90, 200), "bedroom": (200, 60, 40), "kitchen": (60, 180, 60)}
# The options of the smallest real training run: one epoch, 32 px, random init, no worker processes.
TINY_RUN = ["--epochs", "1", "--size", "32", "--no-pretrained", "--workers", "0"]


def folders_args(data_dir, exports_dir) -> list[str]:
    """--data-dir and --exports-dir, for commands run on a test's own folders."""
    return ["--data-dir", str(data_dir), "--exports-dir", str(exports_dir)]


GRID_ARGS = [
    "--archs",
    "resnet18,alexnet",
    "--epochs",
    "1",
    "--size",
    "32",
    "--no-pretrained",
    "--workers",
    "0",
]


def compare_cli(runner, root: Path, *args):
    """`replicate compare rooms` on root/data with the shared grid's arguments, into root/exports."""
    from replicate.cli import app

    return runner.invoke(
        app,
        [
            "compare",
            "rooms",
            *GRID_ARGS,
            *args,
            "--data-dir",
            str(root / "data"),
            "--exports-dir",
            str(root / "exports"),
        ],
    )


@pytest.fixture(scope="session")
def grid(tmp_path_factory) -> tuple[Path, str]:
    """The study's grid in miniature, trained once: resnet18 and alexnet, frozen and unfrozen, on a
    three-class task named like the study's (so tables carry its numbers). (root, compare's output).
    Read it as it is; a test that changes it takes `grid_copy`."""
    root = tmp_path_factory.mktemp("grid")
    make_task(root / "data" / "rooms", classes=ROOMS)
    result = compare_cli(CliRunner(), root)
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.fixture
def grid_copy(grid, tmp_path) -> Path:
    """A copy of the shared grid's root for a test that retrains or deletes. export.pkl files are
    hard links (hundreds of MB for alexnet): nothing rewrites one in place, a retrained run
    replaces its whole folder."""
    import os
    import shutil

    def link_pickles(src, dst):
        return os.link(src, dst) if src.endswith("export.pkl") else shutil.copy2(src, dst)

    shutil.copytree(grid[0], tmp_path / "grid", copy_function=link_pickles, symlinks=True)
    return tmp_path / "grid"


# --- every study arch (and a timm one), trained once ---------------------------------------------

ZOO_SIZES = {
    "resnet18": 32,
    "alexnet": 64,
    "vgg11_bn": 32,
    "densenet121": 32,
    "inception_v3": 299,
    "convnext_atto": 32,
}  # inception_v3 at 299: big enough for its auxiliary branch
ZOO_TIMM = ("efficientnet_b0", "vit_tiny_patch16_224")  # unfrozen only: a BatchNorm CNN and a ViT


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, str]]:
    """Runs of `replicate run` on a 2-class task (4 + 2 photos per class), 2 epochs from random init:
    each ZOO_SIZES arch frozen and unfrozen (the unfrozen ones with --onnx), and the ZOO_TIMM archs
    unfrozen. {(arch, mode): (run folder, the command's output)}. Read them; never change them."""
    from replicate.cli import app

    root = tmp_path_factory.mktemp("zoo")
    make_task(root / "data" / "toy")
    runner, runs = CliRunner(), {}
    todo = [
        (a, s, m, m == "unfrozen") for a, s in ZOO_SIZES.items() for m in ("frozen", "unfrozen")
    ]
    todo += [(a, 32, "unfrozen", False) for a in ZOO_TIMM]
    for arch, size, mode, onnx in todo:
        extra = (["--unfreeze"] if mode == "unfrozen" else []) + (["--onnx"] if onnx else [])
        options = ["--epochs", "2", "--size", str(size), "--no-pretrained", "--workers", "0"]
        where = folders_args(root / "data", root / "exports")
        result = runner.invoke(app, ["run", "toy", "--arch", arch, *options, *where, *extra])
        assert result.exit_code == 0, result.output
        runs[arch, mode] = (root / "exports" / "toy" / f"{arch}-{mode}", result.output)
    return runs


@pytest.fixture(scope="session")
def houses(tmp_path_factory) -> Path:
    """The real Houses zip imported once by `replicate data houses` (rooms, exterior, kitchen);
    returns the data folder. Tests read it (runs and audits write beside it, in ../exports)."""
    from replicate.cli import app

    if not HOUSES_ZIP.is_file():
        pytest.skip(f"the Houses zip is not at {HOUSES_ZIP} (../shared beside the repo)")
    data_dir = tmp_path_factory.mktemp("houses") / "data"
    result = CliRunner().invoke(
        app, ["data", "houses", "--source", str(HOUSES_ZIP), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    return data_dir


def trained_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` done once per test session, by whichever xdist worker asks first (the
    others wait on a file lock in the session's temporary folder, which the workers share), and
    the folder it filled: read-only, shared by the workers (copy what a test changes)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is a folder of this session's; alone, it is the session's
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(f"{shared}.lock"):
        if not (shared / ".done").is_file():
            build(shared)
            (shared / ".done").write_text("")
    return shared


def _rooms_run(root: Path) -> None:
    from replicate.config import RunConfig
    from replicate.training import train

    make_task(root / "data" / "rooms", n_train=4, n_valid=2, classes=ROOMS)
    cfg = RunConfig(
        "rooms",
        "resnet18",
        unfreeze=True,
        epochs=2,
        size=32,
        pretrained=False,
        workers=0,
        data_dir=root / "data",
        exports_dir=root / "exports",
    )
    train.run(cfg, log=lambda *a: None)


@pytest.fixture(scope="session")
def rooms_run(tmp_path_factory) -> tuple[Path, Path]:
    """A three-class task (4 train + 2 valid photos per class) and resnet18 finetuned on it for 2
    epochs at 32 px, with model.onnx: (root, run folder); the task is root/data/rooms. Trained once
    per session (`trained_once`), copied once per worker: tests may add files to the run folder
    (interpret, review) but change nothing in it."""
    root = tmp_path_factory.mktemp("rooms-run")
    copy_runs(trained_once(tmp_path_factory, "rooms-run", _rooms_run), root)
    return root, next((root / "exports" / "rooms").glob("resnet18-*"))


def copy_runs(shared: Path, root: Path) -> None:
    """A `trained_once` folder (data/ and exports/) copied to `root` as if trained there: the
    paths its runs recorded (config.json's task folder, the valid photos in valid_predictions.csv)
    name the copy's own data."""
    import shutil

    shutil.copytree(shared / "data", root / "data", dirs_exist_ok=True)
    shutil.copytree(shared / "exports", root / "exports", dirs_exist_ok=True)
    for recorded in [*root.glob("exports/*/*/*.json"), *root.glob("exports/*/*/*.csv")]:
        text = recorded.read_text()
        if str(shared) in text:
            recorded.write_text(text.replace(str(shared), str(root)))


KITCHEN = {"yes": (200, 180, 60), "no": (40, 60, 200)}


def _tagging_runs(root: Path) -> None:
    from replicate.config import RunConfig
    from replicate.training import train

    make_task(root / "data" / "rooms", classes=ROOMS)
    make_task(root / "data" / "kitchen", n_train=6, n_valid=6, classes=KITCHEN)
    where = dict(epochs=2, size=32, pretrained=False, workers=0, audit=False,
                 data_dir=root / "data", exports_dir=root / "exports")  # fmt: skip
    for task, target in (("rooms", 0.95), ("kitchen", 0.5)):
        train.run(
            RunConfig(task, "resnet18", target_precision=target, **where), log=lambda *a: None
        )


@pytest.fixture(scope="session")
def tagging_runs(tmp_path_factory) -> Path:
    """A folder with data/{rooms,kitchen} and two resnet18 runs on them (rooms: three classes;
    kitchen: yes/no with a search filter at a target precision 6 + 6 photos reach), trained once
    per session (`trained_once`). Read-only: each test file copies it (`copy_tagging_runs`)."""
    return trained_once(tmp_path_factory, "tagging-runs", _tagging_runs)


def copy_tagging_runs(shared: Path, root: Path) -> list[Path]:
    """`tagging_runs`' data and runs copied under `root` (`copy_runs`; copies, not links: a test
    retrains a run in place by copying files over it); returns the two runs (rooms, kitchen)."""
    copy_runs(shared, root)
    return [next((root / "exports" / task).glob("resnet18-*")) for task in ("rooms", "kitchen")]


# --- `replicate serve`, really started (test_serve.py, and the engines' agreement) -------------

TOKEN = "a-token-for-the-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(models: list[Path], *args: str, token: Path | None = None):
    """A `replicate serve` process, ready; yields (client, process). Stopped with SIGTERM, then
    killed if it has not exited within 30 s."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "replicate",
        "serve",
        *map(str, models),
        "--port",
        str(port),
        *args,
    ]
    if token:
        command += ["--token-file", str(token)]
    # Its log (a line per request) goes to a file: a pipe nobody reads fills up and stops it.
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(command, stderr=log, text=True)
    proc.log = lambda: Path(log.name).read_text()
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.log()
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become ready in 90 s"
            time.sleep(0.1)
        yield client, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)
