"""`replicate serve`, really started: a subprocess on 127.0.0.1 and a free port, called with a real
HTTP client (httpx). Parity with `predict`, every refusal, backpressure, the deadline, SIGTERM's
drain, SIGHUP's reload and the token. Every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import TOKEN, copy_tagging_runs, free_port, odd_photos, server, synthetic_photo
from PIL import Image

from replicate.cli import app
from replicate.config import RunConfig
from replicate.training import train


@pytest.fixture(scope="module")
def served(tmp_path_factory, tagging_runs) -> dict:
    """Two runs (rooms: three classes; kitchen: yes/no, a search filter), photos of every kind, and
    predict's tables of them, per photo and per listing."""
    root = tmp_path_factory.mktemp("serve")
    runs = copy_tagging_runs(tagging_runs, root)
    photos = odd_photos(root / "photos")
    upright = synthetic_photo(7, (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: the photo is 200 x 300 upright
    upright.save(photos / "rotated.jpg", exif=exif)
    for i in range(20):
        synthetic_photo(100 + i).save(photos / f"77_{i:02d}.jpg")
    (root / "token").write_text(TOKEN + "\n")
    out = root / "tags.csv"
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app, ["predict", *map(str, runs), str(photos), "--out", str(out), "--listing-pattern", r"^(\d+)_"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    listings = pd.read_csv(root / "tags_listings.csv", dtype={"listing": str}).set_index("listing")
    return {"root": root, "runs": runs, "photos": photos, "table": table, "listings": listings}


@pytest.fixture(scope="module")
def main_server(served):
    with server(served["runs"], token=served["root"] / "token") as (client, proc):
        yield client, proc


def assert_like_predict(answer: dict, row: pd.Series) -> None:
    for name, tags in answer["models"].items():
        assert tags["class"] == row[f"{name}_predicted"]
        for c, p in tags["probabilities"].items():
            assert abs(p - float(row[f"{name}_p_{c}"])) <= 1e-6, (name, c)
        if "threshold" in tags:
            column = next(k for k in tags if k.startswith("has_"))
            assert tags[column] == (str(row[f"{name}_{column}"]) == "True")


def test_a_photo_gets_predicts_numbers(served, main_server):
    client, _ = main_server
    photos, table = served["photos"], served["table"]
    tagged = 0
    for path in sorted(photos.iterdir()):
        row = table.loc[str(path)]
        response = client.post("/v1/photos", content=path.read_bytes())
        if row.error:  # predict could not read it: the server refuses it with a 4xx
            assert 400 <= response.status_code < 500 and set(response.json()) == {"error"}, path
            continue
        assert response.status_code == 200, (path, response.text)
        answer = response.json()
        assert_like_predict(answer, row)
        tagged += 1
    assert tagged >= 26  # the 20 listing photos, rotated, good, gray, cmyk, alpha, 16-bit, huge
    rotated = client.post("/v1/photos", files={"photo": (photos / "rotated.jpg").read_bytes()})
    assert rotated.status_code == 200 and (rotated.json()["width"], rotated.json()["height"]) == (
        200,
        300,
    )
    import hashlib

    assert (
        rotated.json()["sha256"]
        == hashlib.sha256((photos / "rotated.jpg").read_bytes()).hexdigest()
    )
    assert "has_yes" not in rotated.json()["models"]["rooms"]
    assert "threshold" in rotated.json()["models"]["kitchen"]  # the yes/no run is a search filter


def test_a_listing_gets_each_photo_and_the_listing_rule(served, main_server):
    client, _ = main_server
    photos, listings = served["photos"], served["listings"]
    files = [("photos", (p.name, p.read_bytes())) for p in sorted(photos.glob("77_*.jpg"))]
    files.append(("photos", ("text.jpg", (photos / "text.jpg").read_bytes())))
    response = client.post("/v1/listings/77", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["photos"]) == 21 and body["photos"][-1]["status"] == 415
    for photo in body["photos"][:20]:
        assert_like_predict(photo, served["table"].loc[str(photos / photo["name"])])
    expected, answer = listings.loc["77"], body["listing"]
    # predict's listing 77 has its 20 photos; the server's also the text file it could not read
    assert answer.pop("unreadable") == 1 and answer.pop("unreadable_photos") == ["text.jpg"]
    assert set(answer) == set(expected.index) - {"unreadable", "unreadable_photos"}
    for column, value in answer.items():
        if isinstance(value, float):
            assert abs(value - expected[column]) <= 1e-6, column
        else:
            assert value == (expected[column] if expected[column] == expected[column] else ""), (
                column
            )
    assert answer["kitchen_has_kitchen"] == any(
        p["models"]["kitchen"]["has_kitchen"] for p in body["photos"][:20]
    )
    too_many = client.post("/v1/listings/77", files=files * 3)
    assert too_many.status_code in (400, 413) and "error" in too_many.json()
    assert too_many.json()["error"] == "a listing takes at most --max-photos 50 photos"


def png_header_claiming(width: int, height: int, padding: int) -> bytes:
    """A PNG whose header says width x height, followed by `padding` bytes of IDAT: refused from
    its header, before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = os.urandom(padding)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_input_gets_a_4xx_and_the_server_goes_on(served, main_server):
    client, proc = main_server
    photos = served["photos"]
    good = (photos / "good.jpg").read_bytes()

    def chunks():
        for _ in range(25):  # 25 MB, chunked (no Content-Length), over the 20 MB default
            yield b"\xff\xd8\xff" + b"\0" * (1_000_000 - 3)

    cases = [
        (413, dict(content=b"\xff" * 21_000_000)),  # Content-Length over --max-bytes
        (413, dict(content=chunks())),
        (415, dict(content=(photos / "text.jpg").read_bytes())),
        (415, dict(content=b"GIF8" + good)),  # a JPEG behind other bytes: not judged by its name
        (422, dict(content=b"")),
        (422, dict(content=good[: len(good) // 2])),  # truncated
        (422, dict(content=b"\xff\xd8\xff\xe0" + b"\0" * 100)),  # a JPEG's magic, then nothing
        (422, dict(content=png_header_claiming(20_000, 20_000, 1_000_000))),
        (422, dict(files={"a": good, "b": good})),  # two photos to the one-photo route
        (404, dict(url="/v1/nowhere")),
    ]
    for status, kwargs in cases:
        url = kwargs.pop("url", "/v1/photos")
        response = client.post(url, **kwargs)
        assert response.status_code == status, (status, response.text[:200])
        assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
        assert client.get("/readyz").status_code == 200  # still up
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # the scheme is case-insensitive, as HTTP has it; another scheme is no token
    for scheme, status in (("bearer", 200), ("BEARER", 200), ("Basic", 401), ("Bearer", 200)):
        got = client.get("/v1/models", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert got.status_code == status, scheme
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert proc.poll() is None


def test_models_schema_and_metrics(served, main_server):
    client, process = main_server
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["rooms", "kitchen"]
    assert models[1]["filter"]["column"] == "has_kitchen" and len(models[0]["sha256"]) == 64
    schema = client.get("/openapi.json").json()
    assert {"/v1/photos", "/v1/listings/{listing_id}", "/v1/models", "/readyz"} <= set(
        schema["paths"]
    )
    text = client.get("/metrics").text
    assert 'replicate_requests_total{route="/v1/photos",status="200"}' in text
    ready = next(line for line in process.log().splitlines() if " ready: " in line)
    assert all(f"{run / 'model.onnx'}" in ready for run in served["runs"]), ready  # which files
    assert "replicate_batch_photos_bucket" in text and "replicate_queue_photos" in text


def test_a_full_queue_answers_429_with_retry_after(served):
    photo = (served["photos"] / "77_00.jpg").read_bytes()
    with server(served["runs"][:1], "--max-queue", "4", "--max-wait-ms", "50") as (client, _):
        with ThreadPoolExecutor(32) as pool:
            responses = list(
                pool.map(lambda _: client.post("/v1/photos", content=photo), range(32))
            )
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)
        full = next(r for r in responses if r.status_code == 429).json()["error"]
        assert "would pass --max-queue 4" in full and "in hand" in full, full
        assert client.post("/v1/photos", content=photo).status_code == 200  # and it recovers


def test_a_photo_past_its_deadline_is_dropped_with_504(served):
    photo = (served["photos"] / "77_00.jpg").read_bytes()
    with server(served["runs"][:1], "--timeout", "0", "--max-wait-ms", "20") as (client, _):
        response = client.post("/v1/photos", content=photo)
        assert response.status_code == 504 and "--timeout" in response.json()["error"]
        assert client.get("/readyz").status_code == 200


def test_sigterm_answers_what_is_in_hand_then_exits_0(served):
    listing = [("photos", (p.name, p.read_bytes())) for p in sorted(served["photos"].glob("77_*"))]
    listing = (listing * 3)[:50]  # 50 photos a request: about half a second each here
    done, sent_at = [], {}
    with server(served["runs"][:1]) as (client, proc):

        def post_until_refused(i: int):
            for n in range(20):  # bounded: 20 listings a thread at most
                key = (i, n)
                sent_at[key] = time.monotonic()
                try:
                    done.append((key, client.post("/v1/listings/9", files=listing).status_code))
                except httpx.TransportError:
                    done.append((key, "closed"))
                if done[-1][1] != 200:
                    return

        with ThreadPoolExecutor(4) as pool:
            for i in range(4):
                pool.submit(post_until_refused, i)
            time.sleep(1.5)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert client.get("/readyz").status_code == 503  # draining, still answering
        assert proc.wait(30) == 0
        assert "draining: " in proc.log()
    # sent 50 ms before the signal: surely in the server's hands by then
    before = [status for key, status in done if sent_at[key] < signalled - 0.05]
    assert before and set(before) == {200}  # every request in hand was answered in full
    assert {status for _, status in done} <= {200, 503, "closed"} and len(done) == len(sent_at)


def test_sighup_reloads_a_retrained_run_without_a_failed_request(served, tmp_path):
    rooms = served["runs"][0]
    live = tmp_path / "rooms-run"
    shutil.copytree(rooms, live)
    retrained = tmp_path / "retrained"
    cfg = RunConfig("rooms", "resnet18", epochs=1, size=32, pretrained=False, seed=7, workers=0,
                    audit=False, data_dir=served["root"] / "data", exports_dir=retrained)  # fmt: skip
    new_run = train.run(cfg, log=lambda *a: None)
    photo = served["photos"] / "77_03.jpg"

    def alone(run: Path) -> float:
        from replicate.engine import onnx_models

        return float(
            onnx_models.tag_onnx([onnx_models.load_onnx(run)], [photo], progress=False).iloc[0, 3]
        )

    old_p, new_p = alone(rooms), alone(new_run)
    assert abs(old_p - new_p) > 1e-4  # two different models
    answers, stop = [], threading.Event()
    with server([live]) as (client, proc):

        def load():
            end = time.monotonic() + 60
            while not stop.is_set() and len(answers) < 2000 and time.monotonic() < end:
                r = client.post("/v1/photos", content=photo.read_bytes())
                answers.append((r.status_code, r.json()))

        loop = threading.Thread(target=load)
        loop.start()
        before = client.get("/v1/models").json()["models"][0]["sha256"]
        for name in os.listdir(new_run):  # the run folder retrained in place
            if (new_run / name).is_file():
                shutil.copy(new_run / name, live / name)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while client.get("/v1/models").json()["models"][0]["sha256"] == before:
            assert time.monotonic() < deadline, "not reloaded in 30 s"
            time.sleep(0.1)
        time.sleep(0.3)
        (live / "model.onnx").write_bytes(b"broken")  # a reload that fails keeps the models
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        after = client.post("/v1/photos", content=photo.read_bytes()).json()
        stop.set()
        loop.join()
        log = proc.log()
    assert answers and all(status == 200 for status, _ in answers)
    seen = [a["models"]["rooms"]["probabilities"]["bathroom"] for _, a in answers]
    assert abs(seen[0] - old_p) <= 1e-6 and abs(seen[-1] - new_p) <= 1e-6
    assert abs(after["models"]["rooms"]["probabilities"]["bathroom"] - new_p) <= 1e-6
    assert "error: reload failed" in log


def test_it_refuses_to_start_open_to_anyone_or_on_a_broken_model(served, runner, tmp_path):
    result = runner.invoke(app, ["serve", str(served["runs"][0]), "--host", "0.0.0.0"])
    assert (
        result.exit_code == 2 and "--token-file" in result.output and "--no-auth" in result.output
    )
    short = served["root"] / "short-token"
    short.write_text("abc")
    result = runner.invoke(app, ["serve", str(served["runs"][0]), "--token-file", str(short)])
    assert result.exit_code == 2 and "at least 16 characters" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(served["runs"][0], broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    result = runner.invoke(app, ["serve", str(broken), "--port", str(free_port())])
    assert result.exit_code == 2 and result.output.startswith("error: cannot load")
    assert len(result.output.strip().splitlines()) == 1


def test_the_server_loads_no_pytorch(served):
    """Its engine is ONNX Runtime alone: a server process stays small and starts fast."""
    code = (
        "import sys\n"
        "from replicate.serving import server\n"
        f"server.State(server.Options(models=({str(served['runs'][0])!r},))).load()\n"
        "print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
