"""A visual report of a scan: one HTML page that shows why each file was judged as it was.

The page is self-contained: no scripts, fonts or styles from the network; its images (face thumbnails
and saliency overlays, JPEG) are written to a sibling folder it creates (``report_files/`` beside
``report.html``), loaded lazily, so a report of thousands of files opens at once. Files are listed most
suspicious first: a summary table, then per file the faces that decided (each person's most fake and
most real face, with a SmoothGrad heatmap of the reported logit over it, meso_jax.saliency), and for a
video a chart of every face's score over the frames with the verdict threshold drawn in. Files that
could not be scored are listed with the reason. eval_main adds an evaluation section: ROC curve, score
histograms per class and per source, and the worst misses and false alarms.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import os
import pathlib
from typing import Sequence

import cv2
import numpy as np

from meso_jax import records, saliency, scoring

THUMBNAIL_SIDE = 128
JPEG_QUALITY = 85
PERSON_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
WORST_SHOWN = 8

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
th{background:#f3f3f3}.fake{color:#b00020;font-weight:600}.real{color:#1b5e20;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}
section.file{border-top:2px solid #ccc;padding-top:8px;margin-top:18px}
.faces{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;text-align:center;font-size:12px}
figure img{display:block;width:128px;height:128px}.pair{display:flex;gap:2px}.error{color:#b00020}
.muted{color:#666;font-size:13px}svg{background:#fafafa;border:1px solid #ddd}
"""


@dataclasses.dataclass
class _Entry:
    """What the page needs of one file (the crops themselves are already written as thumbnails)."""

    index: int
    record: records.ScanRecord
    thumbnails: list[tuple[records.ShownFace, str, str | None]]  # face, its image, its heatmap overlay
    true_label: str | None = None


class HtmlReport:
    """Collects scan records (``add``), then ``write``s the page. ``heatmaps``: compute saliency maps
    (face models only; a clip model's faces are shown without)."""

    def __init__(self, path: str | os.PathLike, scorer: scoring.Scorer, threshold: float, title: str,
                 heatmaps: bool = True):
        self.path = pathlib.Path(path)
        self.assets_dir = self.path.with_name(self.path.stem + "_files")
        self.assets_dir.mkdir(parents=True, exist_ok=True)
        self.scorer = scorer
        self.threshold = threshold
        self.title = title
        self.heatmaps = heatmaps and len(scorer.input_shape) == 3
        self.entries: list[_Entry] = []
        self.evaluation_html = ""

    def add(self, record: records.ScanRecord, true_label: str | None = None) -> None:
        """Adds one file: writes its faces' thumbnails (and heatmaps) and keeps what the page shows."""
        index = len(self.entries)
        shown = record.shown_faces
        maps = (saliency.saliency_maps(self.scorer, np.stack([face.crop for face in shown]))
                if self.heatmaps and shown else [None] * len(shown))
        thumbnails = []
        for number, (face, heat) in enumerate(zip(shown, maps)):
            face_name = self._write_jpeg(f"f{index:06d}_{number}.jpg", face.crop)
            heat_name = (self._write_jpeg(f"f{index:06d}_{number}_saliency.jpg", saliency.overlay(face.crop, heat))
                         if heat is not None else None)
            thumbnails.append((face, face_name, heat_name))
        record.shown_faces = []  # the crops are on disk now; keep the page's memory small
        self.entries.append(_Entry(index, record, thumbnails, true_label))

    def _write_jpeg(self, name: str, image_rgb: np.ndarray) -> str:
        small = cv2.resize(image_rgb, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise OSError(f"cannot encode {name}")
        (self.assets_dir / name).write_bytes(encoded.tobytes())
        return f"{self.assets_dir.name}/{name}"

    def add_evaluation(self, labels_fake: np.ndarray, scores_real: np.ndarray, sources: Sequence[str] | None,
                       summary_rows: Sequence[tuple[str, str]]) -> None:
        """The evaluation section: ``labels_fake`` 1 = fake, ``scores_real`` the files' scores; ROC curve,
        histograms per class, and per source of fakes when there are several (``sources``: each file's,
        e.g. its manipulation method; each source's histogram shows it against all real files), metrics
        rows, worst errors."""
        parts = ["<h2>Evaluation</h2><table>"]
        parts += [f"<tr><th>{html.escape(name)}</th><td class=num>{html.escape(value)}</td></tr>"
                  for name, value in summary_rows]
        parts.append("</table><div class=faces>")
        parts.append(_roc_svg(labels_fake, scores_real))
        parts.append(_histogram_svg("all files", labels_fake, scores_real, self.threshold))
        fake_sources = sorted({source for source, fake in zip(sources or [], labels_fake) if fake})
        if len(fake_sources) > 1:
            sources_array = np.asarray(sources)
            for source in fake_sources:
                chosen = (labels_fake == 0) | (sources_array == source)
                parts.append(_histogram_svg(f"real vs {source}", labels_fake[chosen], scores_real[chosen],
                                            self.threshold))
        parts.append("</div>")
        scored = [entry for entry in self.entries if entry.record.error is None and entry.true_label]
        misses = sorted((e for e in scored if e.true_label == "fake" and e.record.label == "real"),
                        key=lambda e: -e.record.score)[:WORST_SHOWN]
        alarms = sorted((e for e in scored if e.true_label == "real" and e.record.label == "fake"),
                        key=lambda e: e.record.score)[:WORST_SHOWN]
        for heading, entries in (("Worst misses: fakes judged real", misses),
                                 ("Worst false alarms: reals judged fake", alarms)):
            parts.append(f"<h3>{heading} ({len(entries)} shown)</h3>")
            parts.append("<p class=muted>none</p>" if not entries else
                         "<div class=faces>" + "".join(self._face_figures(e, link=True) for e in entries) + "</div>")
        self.evaluation_html = "".join(parts)

    def write(self) -> pathlib.Path:
        """Writes the page (most suspicious first, files that failed last); returns its path."""
        scored = sorted((e for e in self.entries if e.record.error is None), key=lambda e: e.record.score)
        failed = [e for e in self.entries if e.record.error is not None]
        fake_count = sum(1 for e in scored if e.record.label == "fake")
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                 f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>",
                 f"<p>{len(self.entries)} files: {fake_count} judged fake, {len(scored) - fake_count} real, "
                 f"{len(failed)} not scored. Score = probability the content is <b>real</b>; real when score &ge; "
                 f"{self.threshold:.3f}. Model: {html.escape(self.scorer.model_source)}. {html.escape(stamp)}.</p>",
                 "<p class=muted>Heatmaps: SmoothGrad of the model's logit for the reported score; bright pixels "
                 "moved the score most (towards real or fake). They show where the model looked, not proof of "
                 "manipulation.</p>", self.evaluation_html,
                 "<h2>Files, most suspicious first</h2><table><tr><th>#</th><th>file</th>"
                 + ("<th>truth</th>" if any(e.true_label for e in self.entries) else "")
                 + "<th>verdict</th><th>score</th><th>certainty</th><th>people</th><th>faces/frames</th></tr>"]
        with_truth = any(e.true_label for e in self.entries)
        for rank, entry in enumerate(scored, start=1):
            record = entry.record
            truth = f"<td>{html.escape(entry.true_label or '')}</td>" if with_truth else ""
            parts.append(f"<tr class=row><td class=num>{rank}</td><td><a href='#f{entry.index}'>"
                         f"{html.escape(records.printable_path(record.path))}</a></td>{truth}"
                         f"<td class={record.label}>{record.label}</td><td class=num>{record.score:.4f}</td>"
                         f"<td>{html.escape(record.certainty)}</td><td class=num>{len(record.people)}</td>"
                         f"<td class=num>{record.faces}/{record.frames}</td></tr>")
        parts.append("</table>")
        if failed:
            parts.append(f"<h2>Not scored ({len(failed)})</h2><table><tr><th>file</th><th>reason</th></tr>")
            parts += [f"<tr class=row-error><td>{html.escape(records.printable_path(e.record.path))}</td>"
                      f"<td class=error>{html.escape(e.record.error)}</td></tr>" for e in failed]
            parts.append("</table>")
        parts += [self._file_section(entry) for entry in scored]
        parts.append("</body></html>\n")
        temporary = self.path.with_name(self.path.name + ".partial")
        temporary.write_text("".join(parts), encoding="utf-8")
        os.replace(temporary, self.path)
        return self.path

    def _face_figures(self, entry: _Entry, link: bool = False) -> str:
        figures = []
        for face, face_name, heat_name in entry.thumbnails:
            label = records.verdict(face.score, self.threshold)
            who = f"person #{face.person + 1}, " if len(entry.record.people) > 1 else ""
            where = f"frame {face.frame}, " if entry.record.kind == "video" else ""
            name = os.path.basename(entry.record.path)
            caption = (f"<a href='#f{entry.index}'>{html.escape(name)}</a><br>" if link else "") + \
                f"{who}{where}<span class={label}>{face.score:.3f} {label}</span>"
            images = f"<img src='{html.escape(face_name)}' alt='face' loading=lazy>"
            if heat_name:
                images += f"<img src='{html.escape(heat_name)}' alt='saliency heatmap' loading=lazy>"
            figures.append(f"<figure><div class=pair>{images}</div><figcaption>{caption}</figcaption></figure>")
        return "".join(figures)

    def _file_section(self, entry: _Entry) -> str:
        record = entry.record
        people = "".join(
            f"<li><span style='color:{PERSON_COLOURS[rank % len(PERSON_COLOURS)]}'>&#9632;</span> person #{rank + 1}: "
            f"<span class={person.label}>{person.label} {person.score:.3f}</span>, "
            f"{records.count_of(person.frames, 'frame')}, "
            f"first seen at x={person.box[0]} y={person.box[1]} "
            f"({person.box[2]}&times;{person.box[3]} px)</li>" for rank, person in enumerate(record.people))
        chart = _frame_chart_svg(record, self.threshold) if record.kind == "video" else ""
        truth = f" (truth: {html.escape(entry.true_label)})" if entry.true_label else ""
        return (f"<section class=file id='f{entry.index}'><h3>{html.escape(records.printable_path(record.path))}</h3>"
                f"<p><span class={record.label}>{record.label}</span> {record.score:.4f} "
                f"({html.escape(record.certainty)})"
                f"{truth}; {record.kind}, {records.count_of(record.faces, 'face')} scored of "
                f"{records.count_of(record.frames, 'frame')}."
                f"{' The most fake person decides.' if len(record.people) > 1 else ''}</p><ul>{people}</ul>"
                f"<div class=faces>{self._face_figures(entry)}</div>{chart}</section>")


def _frame_chart_svg(record: records.ScanRecord, threshold: float, width: int = 560, height: int = 150) -> str:
    """Each person's face scores over the frames (one line each), the threshold dashed."""
    left, right, top, bottom = 34, 8, 8, 22
    last_frame = max(record.frame_indices) if record.frame_indices else 1

    def x_of(frame: int) -> float:
        return left + (width - left - right) * frame / max(1, last_frame)

    def y_of(score: float) -> float:
        return top + (height - top - bottom) * (1.0 - score)

    parts = [f"<svg width={width} height={height} viewBox='0 0 {width} {height}' role=img "
             f"aria-label='score per frame'>",
             f"<line x1={left} x2={width - right} y1={y_of(threshold):.1f} y2={y_of(threshold):.1f} "
             f"stroke='#555' stroke-dasharray='4 3'/>",
             f"<text x={width - right} y={y_of(threshold) - 3:.1f} font-size=10 text-anchor=end>threshold "
             f"{threshold:.3f}</text>"]
    for value in (0.0, 0.5, 1.0):
        parts.append(f"<text x={left - 4} y={y_of(value) + 3:.1f} font-size=10 text-anchor=end>{value:g}</text>")
    parts.append(f"<text x={left} y={height - 6} font-size=10>frame 0</text>"
                 f"<text x={width - right} y={height - 6} font-size=10 text-anchor=end>frame {last_frame}</text>"
                 f"<text x={(left + width) / 2:.0f} y={height - 6} font-size=10 text-anchor=middle>"
                 f"score (1 = real)</text>")
    for rank in range(len(record.people)):
        points = sorted((frame, score) for frame, who, score
                        in zip(record.frame_indices, record.frame_people, record.frame_scores) if who == rank)
        colour = PERSON_COLOURS[rank % len(PERSON_COLOURS)]
        path = " ".join(f"{x_of(frame):.1f},{y_of(score):.1f}" for frame, score in points)
        parts.append(f"<polyline points='{path}' fill=none stroke='{colour}' stroke-width='1.5'/>")
        parts += [f"<circle cx={x_of(frame):.1f} cy={y_of(score):.1f} r=2 fill='{colour}'/>" for frame, score in points]
    parts.append("</svg>")
    return "".join(parts)


def _roc_svg(labels_fake: np.ndarray, scores_real: np.ndarray, side: int = 260) -> str:
    """ROC curve of detecting fakes (a lower score = more fake), with its AUC."""
    from sklearn import metrics as sk_metrics  # pylint: disable=import-outside-toplevel  (only for reports)

    if len(set(labels_fake.tolist())) < 2:
        return "<p class=muted>ROC: needs both real and fake files.</p>"
    false_alarm_rate, detection_rate, _ = sk_metrics.roc_curve(labels_fake, -scores_real)
    auc = sk_metrics.auc(false_alarm_rate, detection_rate)
    margin = 30
    plot = side - 2 * margin
    points = " ".join(f"{margin + plot * x:.1f},{margin + plot * (1 - y):.1f}"
                      for x, y in zip(false_alarm_rate, detection_rate))
    return (f"<svg width={side} height={side} role=img aria-label='ROC curve'>"
            f"<rect x={margin} y={margin} width={plot} height={plot} fill=none stroke='#999'/>"
            f"<line x1={margin} y1={margin + plot} x2={margin + plot} y2={margin} stroke='#ccc' "
            f"stroke-dasharray='3 3'/>"
            f"<polyline points='{points}' fill=none stroke='#d62728' stroke-width='2'/>"
            f"<text x={side / 2} y=18 font-size=12 text-anchor=middle>ROC, AUC {auc:.3f}</text>"
            f"<text x={side / 2} y={side - 8} font-size=10 text-anchor=middle>reals judged fake (rate)</text>"
            f"<text x=10 y={side / 2} font-size=10 transform='rotate(-90 10 {side / 2})' text-anchor=middle>"
            f"fakes caught (rate)</text></svg>")


def _histogram_svg(title: str, labels_fake: np.ndarray, scores_real: np.ndarray, threshold: float,
                   width: int = 300, height: int = 160, bins: int = 20) -> str:
    """Score histograms of real and fake files (overlaid), the threshold marked."""
    margin, bottom = 24, 22
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = {label: np.histogram(scores_real[labels_fake == value], bins=edges)[0]
              for label, value in (("real", 0), ("fake", 1))}
    tallest = max(1, max(int(c.max(initial=0)) for c in counts.values()))
    bar = (width - 2 * margin) / bins
    parts = [f"<svg width={width} height={height} role=img aria-label='score histogram {html.escape(title)}'>",
             f"<text x={width / 2} y=14 font-size=12 text-anchor=middle>{html.escape(title)}: "
             f"{int(counts['real'].sum())} real, {int(counts['fake'].sum())} fake</text>"]
    for label, colour in (("real", "#2ca02c"), ("fake", "#d62728")):
        for i, count in enumerate(counts[label]):
            bar_height = (height - bottom - 20) * count / tallest
            parts.append(f"<rect x={margin + i * bar:.1f} y={height - bottom - bar_height:.1f} width={bar - 1:.1f} "
                         f"height={bar_height:.1f} fill='{colour}' fill-opacity='0.5'/>")
    x_threshold = margin + (width - 2 * margin) * threshold
    parts.append(f"<line x1={x_threshold:.1f} x2={x_threshold:.1f} y1=20 y2={height - bottom} stroke='#333' "
                 f"stroke-dasharray='4 3'/><text x={margin} y={height - 6} font-size=10>0 (fake)</text>"
                 f"<text x={width - margin} y={height - 6} font-size=10 text-anchor=end>1 (real)</text></svg>")
    return "".join(parts)
