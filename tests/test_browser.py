"""The HTML pages in a real headless Chromium: the review and audit pages' keys, buttons and downloads,
and every image of the compare report. Skipped where Playwright or Chromium is missing, except
under REPLICATE_REQUIRE_BROWSER=1 (CI), where that fails.

    python -m pytest tests/test_browser.py
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile

import pandas as pd
import pytest
from conftest import HOUSES_ZIP, requires_houses
from test_audit import task  # noqa: F401  (a task with a leak, a conflict and a duplicate)
from test_cleaning import trained, tree  # noqa: F401  (the module's trained-model fixture)

from replicate.cli import app
from replicate.data.sources import HOUSE_PHOTO
from replicate.labelling.rounds import task_photos

# CI sets REPLICATE_REQUIRE_BROWSER=1 after installing Chromium: there a missing browser fails, never skips.
REQUIRED = os.environ.get("REPLICATE_REQUIRE_BROWSER") == "1"
if not REQUIRED:
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
import playwright.sync_api  # noqa: E402  (there, or this module was skipped just above)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRED,
    reason="no Chromium on this machine (apt-get install chromium)",
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.fail(
            "REPLICATE_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)"
        )
    with playwright.sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_review_page_decisions_download_and_clean_round_trip(trained, runner, browser, tmp_path):  # noqa: F811
    root, run_dir = trained
    task_dir = tmp_path / "data" / "rooms"
    shutil.copytree(root / "data" / "rooms", task_dir)
    assert runner.invoke(app, ["review", str(run_dir), "-k", "3"]).exit_code == 0
    # The page names files in the module's data folder; point them at this test's copy.
    page_html = (
        (run_dir / "review.html").read_text().replace(str(root / "data"), str(tmp_path / "data"))
    )
    (tmp_path / "review.html").write_text(page_html)
    before = tree(task_dir)

    page = browser.new_page(accept_downloads=True)
    page.goto(f"file://{tmp_path / 'review.html'}")
    page.keyboard.press("x")  # first card: remove, and the selection moves on
    page.keyboard.press("a")  # second card: keep
    third = page.locator(".card").nth(2)
    third.locator("button[data-action=relabel]").first.click()
    assert page.locator("#count").inner_text() == "3"
    with page.expect_download() as download:
        page.click("#download")
    decisions = tmp_path / "decisions.csv"
    download.value.save_as(decisions)

    rows = pd.read_csv(decisions, keep_default_na=False)
    assert list(rows.columns) == ["path", "action", "new_label"]
    assert list(rows.action) == ["remove", "keep", "relabel"] and rows.new_label.iloc[2] != ""
    applied = runner.invoke(
        app,
        [
            "clean",
            "rooms",
            "--data-dir",
            str(tmp_path / "data"),
            "--decisions",
            str(decisions),
            "--apply",
        ],
    )
    assert applied.exit_code == 0, applied.output
    assert tree(task_dir) != before
    log = next((task_dir / "_cleaning").glob("*.csv"))
    assert (
        runner.invoke(
            app, ["clean", "rooms", "--data-dir", str(tmp_path / "data"), "--undo", str(log)]
        ).exit_code
        == 0
    )
    assert {k: v for k, v in tree(task_dir).items() if not k.startswith("_cleaning/")} == before


def test_compare_report_shows_the_table_and_every_image(grid, browser):
    page = browser.new_page()
    page.goto(f"file://{grid[0] / 'exports' / 'rooms' / 'compare' / 'report.html'}")
    assert page.locator("table tr").count() == 5  # header + 2 archs x (frozen, unfrozen)
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == 5 + 2 * 4 and all(done and width > 0 for done, width in sizes)


def test_compare_table_fits_1400_px_with_the_other_columns_behind_a_toggle(grid, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"file://{grid[0] / 'exports' / 'rooms' / 'compare' / 'report.html'}")
    shown = lambda: page.locator("table th:visible").all_inner_texts()  # noqa: E731
    first = shown()
    assert first[:2] == ["arch", "mode"] and "max_valid_acc" in first and "paper_acc" in first
    assert "images_per_s" not in first and "acc_std" not in first
    assert page.eval_on_selector("table", "t => t.getBoundingClientRect().right") <= 1400
    page.click("#toggle")
    every = shown()
    assert set(first) < set(every) and {"images_per_s", "acc_std", "leaked_valid"} <= set(every)
    page.click("#toggle")
    assert shown() == first


def test_audit_page_preselects_suggestions_and_downloads_decisions_for_clean(
    task, runner, browser, tmp_path
):
    exports = tmp_path / "exports"
    assert (
        runner.invoke(
            app, ["audit", "rooms", "--data-dir", str(task), "--exports-dir", str(exports)]
        ).exit_code
        == 0
    )
    page = browser.new_page(accept_downloads=True)
    page.goto(f"file://{exports / 'rooms' / 'audit' / 'audit.html'}")
    assert (
        page.locator("#count").inner_text() == "6"
    )  # every card of the 3 groups starts with its suggestion
    leaked = page.locator('.card[data-path$="valid/kitchen/leak_b.jpg"]')
    assert leaked.get_attribute("data-decision") == "remove"
    leaked.locator("button[data-action=move]").click()  # rather move the copy into train
    with page.expect_download() as download:
        page.click("#download")
    decisions = tmp_path / "decisions.csv"
    download.value.save_as(decisions)
    rows = pd.read_csv(decisions, keep_default_na=False).set_index("path")
    assert (
        rows.loc[str((task / "rooms" / "valid" / "kitchen" / "leak_b.jpg").resolve()), "action"]
        == "move"
    )
    applied = runner.invoke(
        app, ["clean", "rooms", "--data-dir", str(task), "--decisions", str(decisions), "--apply"]
    )
    assert applied.exit_code == 0, applied.output
    assert (task / "rooms" / "train" / "kitchen" / "leak_b.jpg").is_file()


@requires_houses
def test_a_new_filter_labelled_in_the_page_in_three_rounds_then_trained(runner, browser, tmp_path):
    """As a new user would: 160 mixed Houses photos (40 houses x 4 rooms) as the pool, "is it a
    kitchen?", three rounds of 20 labelled in the page (the model's guesses corrected with the keys),
    then `run` on the task."""
    pool = tmp_path / "pool"
    pool.mkdir()
    with zipfile.ZipFile(HOUSES_ZIP) as zf:
        found = [(int(m[1]), name) for name in zf.namelist() if (m := HOUSE_PHOTO.search(name))]
        for house, name in sorted(found):
            if house <= 40:
                (pool / name.rsplit("/", 1)[1]).write_bytes(zf.read(name))
    assert len(list(pool.iterdir())) == 160
    where = ["--data-dir", str(tmp_path / "data"), "--exports-dir", str(tmp_path / "exports")]
    first = runner.invoke(app, ["label", "kitchen", "--pool", str(pool), *where])
    assert first.exit_code == 0, first.output
    out = tmp_path / "exports" / "kitchen" / "label"
    for number in (1, 2, 3):
        page = browser.new_page(accept_downloads=True)
        page.goto(f"file://{out / f'round-{number}.html'}")
        cards = page.locator(".card")
        assert cards.count() == 20
        assert page.locator("#labelled").inner_text() == str(20 * (number - 1))
        accuracy = page.locator("#accuracy").inner_text()
        assert (
            re.match(r"\d+\.\d% accuracy, cross-validated over all \d+ labels", accuracy)
            is not None
        ) == (number > 1), accuracy
        assert page.locator("#count").inner_text() == (
            "0" if number == 1 else "20"
        )  # guesses preselected
        corrected = 0
        for i in range(20):
            card = cards.nth(i)
            want = "yes" if "_kitchen" in card.get_attribute("data-path") else "no"
            if card.locator(".decision").inner_text() == f"label as {want}":
                continue
            card.locator("img").click()  # select it, then its key (1 yes, 2 no)
            page.keyboard.press("1" if want == "yes" else "2")
            assert card.get_attribute("data-decision") == "label"
            corrected += 1
        if number > 1:
            assert corrected <= 6, corrected  # the model's guesses are mostly right already
        assert page.locator("#count").inner_text() == "20"
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename == f"kitchen-round-{number}.csv"
        decisions = tmp_path / download.value.suggested_filename
        download.value.save_as(decisions)
        page.close()
        rows = pd.read_csv(decisions, keep_default_na=False)
        assert (
            list(rows.columns) == ["path", "action", "new_label"] and (rows.action == "label").all()
        )
        assert (rows.new_label == rows.path.map(lambda p: "yes" if "_kitchen" in p else "no")).all()
        applied = runner.invoke(app, ["label", "kitchen", "--apply", str(decisions), *where])
        assert applied.exit_code == 0, applied.output

    photos = task_photos(tmp_path / "data" / "kitchen")
    assert (
        len(photos) == 60
        and set(photos.split) == {"train", "valid"}
        and set(photos.label) == {"yes", "no"}
    )
    ran = runner.invoke(
        app,
        [
            "run",
            "kitchen",
            "--arch",
            "tf_efficientnet_lite0",
            "--freeze-bn",
            "--cache-features",
            "3",
            "--epochs",
            "10",
            "--workers",
            "0",
            *where,
        ],
    )
    assert ran.exit_code == 0, ran.output
    assert re.search(r"best valid accuracy \d+\.\d\d% at epoch", ran.output)
    run_dir = next((tmp_path / "exports" / "kitchen").glob("tf_efficientnet_lite0-*"))
    for name in (
        "config.json",
        "metrics.json",
        "history.csv",
        "export.pkl",
        "valid_predictions.csv",
        "confusion_matrix.png",
        "top_losses.png",
        "filter.json",
        "pr_curve.png",
    ):
        assert (run_dir / name).is_file(), name
