"""The visual report (meso_jax.report): its content, saliency sanity checks, and the page in a real browser."""

from __future__ import annotations

import html
import os
import pathlib
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.stats

from data_pipelines.preprocessing import Preprocessing, resize_image
from data_pipelines.synthesize import self_blend_with_mask
from meso_jax import checkpoints, records, report, saliency, scan, scoring
from tests.conftest import REPO_ROOT, random_model_variables, write_video

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _scorer(variables: dict | None = None, flip_average: bool = True) -> scoring.Scorer:
    loaded = checkpoints.LoadedModel("meso4", variables or random_model_variables(seed=3, head_gain=8.0),
                                     Preprocessing(face_detector="none").to_dict(), {})
    return scoring.Scorer(loaded, batch_size=4, flip_average=flip_average)


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, list[records.ScanRecord]]:
    """A folder of 3 noise images, a 6-frame video and a broken file, scanned into a report by a random
    model (no face detector): (folder, report path, records)."""
    root = tmp_path_factory.mktemp("report")
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        cv2.imwrite(str(media / f"image{index}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    write_video(media / "clip.avi", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)])
    (media / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    scorer = _scorer()
    html_report = report.HtmlReport(root / "out" / "report.html", scorer, 0.5, "Scan of media")
    records = []

    def keep(record):
        records.append(record)
        html_report.add(record)

    options = scan.ScanOptions(threshold=0.5, keep_faces=True, workers=1)
    paths = list(scan.select_media(str(media)))
    scan.scan_files(paths, scorer, Preprocessing(face_detector="none", frames_per_video=6), options, keep)
    html_report.write()
    return media, html_report.path, records


def test_the_report_lists_files_most_suspicious_first_with_their_faces(small_scan):
    _, path, records = small_scan
    page = path.read_text()
    scored = sorted((r for r in records if r.error is None), key=lambda r: r.score)
    listed = re.findall(r"<tr class=row><td class=num>\d+</td><td><a href='#f\d+'>([^<]+)</a>", page)
    assert listed == [r.path for r in scored] and len(listed) == 4
    broken = next(r for r in records if r.error is not None)
    not_scored = page.split("Not scored (1)")[1]
    assert "broken.jpg" in not_scored and html.escape(broken.error) in not_scored
    images = re.findall(r"<img src='([^']+)'", page)
    video = next(r for r in records if r.kind == "video")
    # An image shows its face once; the video its most fake and most real frame; each with its heatmap.
    assert len(images) == 2 * (3 * 1 + 2) and all((path.parent / image).is_file() for image in images)
    assert page.count("saliency.jpg") == 5 and page.count("<polyline") == 1  # the video's chart
    assert "threshold 0.500" in page and video.path in page


def test_the_report_is_self_contained(small_scan):
    _, path, _ = small_scan
    page = path.read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing from the network
    assert "<script" not in page and "<link" not in page
    for image in re.findall(r"<img src='([^']+)'", page):
        decoded = cv2.imread(str(path.parent / image))
        assert decoded is not None and decoded.shape == (report.THUMBNAIL_SIDE, report.THUMBNAIL_SIDE, 3)


def test_predict_main_writes_a_report_and_refuses_a_bad_report_path(tmp_path, small_scan):
    media, _, _ = small_scan
    model = tmp_path / "model"
    checkpoints.save_model(model, "meso4", random_model_variables(seed=3, head_gain=8.0),
                           Preprocessing(face_detector="none", frames_per_video=6).to_dict(), {})
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))

    def run(*flags):
        return subprocess.run([sys.executable, str(REPO_ROOT / "predict_main.py"), f"--path={media}",
                               f"--checkpoint={model}", "--noprogress", *flags],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

    done = run(f"--report={tmp_path / 'scan.html'}", "--format=json")
    assert done.returncode == 1 and len(done.stdout.splitlines()) == 5  # the broken file: exit status 1
    assert (tmp_path / "scan.html").is_file() and len(list((tmp_path / "scan_files").iterdir())) == 10
    for bad, reason in ((tmp_path / "report.txt", "give an .html file name"),
                        (tmp_path / "missing" / "r.html", "no such folder")):
        refused = run(f"--report={bad}")
        assert refused.returncode == 2 and reason in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_eval_main_report_has_roc_histograms_and_the_worst_errors(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for label in ("real", "fake"):
        (data / label).mkdir(parents=True)
        for index in range(4):
            cv2.imwrite(str(data / label / f"{label}{index}.png"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    model = tmp_path / "model"
    checkpoints.save_model(model, "meso4", random_model_variables(seed=5, head_gain=8.0),
                           Preprocessing(face_detector="none").to_dict(), {})
    done = subprocess.run([sys.executable, str(REPO_ROOT / "eval_main.py"), f"--path={data}",
                           f"--output_dir={tmp_path / 'out'}", f"--checkpoint={model}", "--noprogress",
                           f"--report={tmp_path / 'out' / 'eval.html'}"],
                          cwd=REPO_ROOT, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "out" / "eval.html").read_text()
    assert "aria-label='ROC curve'" in page and page.count("aria-label='score histogram") == 1
    assert "Worst misses: fakes judged real" in page and "Worst false alarms: reals judged fake" in page
    assert page.count("<tr class=row>") == 8 and "<th>truth</th>" in page


# --- saliency sanity checks (Adebayo et al., NeurIPS 2018) ---

@pytest.fixture(scope="module")
def shipped():
    from meso_jax import load_detector
    return load_detector()


def _real_faces(shared_dir: pathlib.Path, count: int, prep: Preprocessing) -> np.ndarray:
    files = sorted((shared_dir / "dfdc_faces" / "val" / "real").iterdir())[:count]
    return np.stack([resize_image(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), prep) for f in files])


def test_saliency_changes_when_the_weights_are_randomised(shared_dir, shipped):
    faces = _real_faces(shared_dir, 4, shipped.preprocessing)
    trained = saliency.saliency_maps(shipped.scorer, faces)
    randomised = saliency.saliency_maps(_scorer(random_model_variables(seed=11)), faces)
    again = saliency.saliency_maps(shipped.scorer, faces)
    np.testing.assert_allclose(trained, again, atol=1e-5)  # deterministic for one model and seed
    correlations = [scipy.stats.spearmanr(ours[::4, ::4].ravel(), random_map[::4, ::4].ravel())[0]
                    for ours, random_map in zip(trained, randomised)]
    assert np.mean(correlations) < 0.5, correlations  # 16 faces, two random models: 0.14 and 0.29
    assert trained.shape == (4, 256, 256) and 0.0 <= trained.min() and trained.max() <= 1.0


def test_saliency_of_self_blended_fakes_falls_inside_the_blend(shared_dir, shipped):
    """More heatmap per pixel inside the blended region than outside (the ratio is in MODEL_CARD.md)."""
    faces = _real_faces(shared_dir, 8, shipped.preprocessing)
    rng = np.random.default_rng(0)
    blended, masks = zip(*(self_blend_with_mask(face, rng) for face in faces))
    maps = saliency.saliency_maps(shipped.scorer, np.stack(blended))
    ratios = [saliency.mass_inside(heat, mask > 0.5 * mask.max()) for heat, mask in zip(maps, masks)]
    assert np.median(ratios) > 1.0, ratios


def test_saliency_refuses_clip_models():
    loaded = checkpoints.LoadedModel("meso4_video", random_model_variables(seed=2, model_name="meso4_video"),
                                     Preprocessing().to_dict(), {})
    with pytest.raises(ValueError, match="clips"):
        saliency.saliency_maps(scoring.Scorer(loaded, batch_size=2), np.zeros((1, 8, 256, 256, 3), np.uint8))


# --- in a real browser ---

@pytest.mark.browser
def test_the_report_opens_in_headless_chromium_without_errors(small_scan):
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; scripts/install.sh --tests does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    _, path, records = small_scan
    problems = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: problems.append(message.text)
                    if message.type in ("error", "warning") else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
            page.goto(path.as_uri(), wait_until="load")
            result = page.evaluate("""async () => {
                const images = [...document.images];
                images.forEach(image => { image.loading = 'eager'; });
                const decoded = await Promise.all(images.map(image => image.decode()
                    .then(() => image.naturalWidth > 0).catch(() => false)));
                return {images: images.length, decoded: decoded.filter(Boolean).length,
                        rows: document.querySelectorAll('tr.row').length,
                        errors: document.querySelectorAll('tr.row-error').length};
            }""")
        finally:
            browser.close()
    assert problems == []
    assert result["images"] == result["decoded"] == 10
    assert result["rows"] == sum(r.error is None for r in records) and result["errors"] == 1
