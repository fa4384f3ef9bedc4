"""Finding media, labels and splits; splitting by source without leakage (data_pipelines.sources)."""

from __future__ import annotations

import json
import os

import pytest

from data_pipelines.preprocessing import MediaError
from data_pipelines.sources import FAKE, REAL, find_media, load_labelled_splits


def touch(root, *relative_paths) -> None:
    for relative in relative_paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def no_leakage(splits) -> set[str]:
    train_sources = {f.source for f in splits.train}
    val_sources = {f.source for f in splits.val}
    assert not train_sources & val_sources
    return val_sources


def test_find_media_is_recursive_sorted_and_survives_symlink_loops(tmp_path):
    touch(tmp_path, "b/2.png", "b/1.JPG", "a/deep/er/clip.MOV", "notes.txt", ".hidden/x.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    found = [os.path.relpath(p, tmp_path) for p in find_media(tmp_path)]
    assert found == ["a/deep/er/clip.MOV", "b/1.JPG", "b/2.png"]
    assert [os.path.basename(p) for p in find_media(tmp_path, kinds=("video",))] == ["clip.MOV"]
    assert list(find_media(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    with pytest.raises(MediaError, match="no such file"):
        list(find_media(tmp_path / "missing"))


def test_case_insensitive_class_folders_and_aliases(tmp_path):
    touch(tmp_path, "Original/v1/f1.jpg", "MANIPULATED/x/deeper/v2.png", "Real/r.jpg", "other/skip.jpg")
    splits = load_labelled_splits(tmp_path, val_fraction=0.0)
    labels = {os.path.basename(f.path): f.label for f in splits.train}
    assert labels == {"f1.jpg": REAL, "r.jpg": REAL, "v2.png": FAKE}
    assert splits.val == [] and splits.test == []


def test_explicit_splits_are_kept(tmp_path):
    touch(tmp_path, "train/real/a.jpg", "train/fake/b.jpg", "val/real/c.jpg", "val/fake/d.jpg", "test/fake/e.jpg")
    splits = load_labelled_splits(tmp_path)
    assert [os.path.basename(f.path) for f in splits.train] == ["a.jpg", "b.jpg"]
    assert [os.path.basename(f.path) for f in splits.val] == ["c.jpg", "d.jpg"]
    assert [os.path.basename(f.path) for f in splits.test] == ["e.jpg"]


def test_mesonets_own_dataset_layout_is_understood(tmp_path):
    """MesoNet's published databases: train_test/ and validation/ splits holding df/ (or f2f/) and real/."""
    touch(tmp_path / "deepfake", "train_test/df/a.jpg", "train_test/real/b.jpg", "validation/DF/c.jpg",
          "validation/real/d.jpg")
    touch(tmp_path / "face2face", "real/r.jpg", "f2f/e.jpg")
    splits = load_labelled_splits(tmp_path / "deepfake")
    assert sorted((os.path.basename(f.path), f.label) for f in splits.train) == [("a.jpg", FAKE), ("b.jpg", REAL)]
    assert sorted((os.path.basename(f.path), f.label) for f in splits.val) == [("c.jpg", FAKE), ("d.jpg", REAL)]
    splits = load_labelled_splits(tmp_path / "face2face", val_fraction=0.0)
    assert sorted((os.path.basename(f.path), f.label) for f in splits.train) == [("e.jpg", FAKE), ("r.jpg", REAL)]


def test_frames_of_one_video_stay_together(tmp_path):
    for video in range(20):
        touch(tmp_path, *[f"real/video{video:02d}/frame{i}.png" for i in range(5)])
        touch(tmp_path, *[f"fake/fakevid{video:02d}_{i:04d}.jpg" for i in range(5)])  # <video>_<frame> naming
    splits = load_labelled_splits(tmp_path, val_fraction=0.2, seed=3)
    val_sources = no_leakage(splits)
    assert 10 <= len(splits.val) <= 60 and len(val_sources) >= 2
    assert len({f.source for f in splits.train + splits.val}) == 40


def test_faceforensics_fakes_stay_with_their_originals(tmp_path):
    ids = [f"{i:03d}" for i in range(30)]
    touch(tmp_path, *[f"real/{i}.mp4" for i in ids])
    touch(tmp_path, *[f"fake/Deepfakes/{a}_{b}.mp4" for a, b in zip(ids[::2], ids[1::2])])
    touch(tmp_path, *[f"fake/ffpp_faceswap_{a}_{b}.mp4" for a, b in zip(ids[::2], ids[1::2])])
    for seed in range(5):
        splits = load_labelled_splits(tmp_path, val_fraction=0.3, seed=seed)
        no_leakage(splits)
        val_ids = {os.path.basename(f.path)[:3] for f in splits.val if f.label == REAL}
        for fake in (f for f in splits.train if f.label == FAKE):
            assert not set(os.path.basename(fake.path)[-11:-4].split("_")) & val_ids


@pytest.mark.parametrize("metadata_name", ["metadata.csv", "metadata.json"])
def test_dfdc_metadata_keeps_fakes_with_their_originals(tmp_path, metadata_name):
    originals = [f"orig{i:03d}x" for i in range(15)]
    fakes = {f"fake{i:03d}{j}": originals[i] for i in range(15) for j in "ab"}
    touch(tmp_path, *[f"real/{name}.mp4" for name in originals], *[f"fake/{name}.mp4" for name in fakes])
    if metadata_name == "metadata.csv":
        lines = ["file,label,original"] + [f"{n}.mp4,REAL," for n in originals]
        lines += [f"{n}.mp4,FAKE,{o}.mp4" for n, o in fakes.items()]
        (tmp_path / metadata_name).write_text("\n".join(lines) + "\n")
    else:
        records = {f"{n}.mp4": {"label": "REAL", "split": "train"} for n in originals}
        records.update({f"{n}.mp4": {"label": "FAKE", "split": "train", "original": f"{o}.mp4"}
                        for n, o in fakes.items()})
        (tmp_path / "fake" / metadata_name).write_text(json.dumps(records))
    splits = load_labelled_splits(tmp_path, val_fraction=0.3, seed=1)
    no_leakage(splits)
    assert len({f.source for f in splits.train + splits.val}) == 15
    val_names = {os.path.basename(f.path)[:-4] for f in splits.val}
    for name, original in fakes.items():
        assert (name in val_names) == (original in val_names)


def test_split_is_deterministic_per_seed(tmp_path):
    touch(tmp_path, *[f"real/r{i}.jpg" for i in range(40)], *[f"fake/f{i}.jpg" for i in range(40)])
    first = load_labelled_splits(tmp_path, val_fraction=0.25, seed=7)
    again = load_labelled_splits(tmp_path, val_fraction=0.25, seed=7)
    other = load_labelled_splits(tmp_path, val_fraction=0.25, seed=8)
    assert first.val == again.val and first.val != other.val and len(first.val) == 20


def test_missing_class_or_folders_are_one_line_value_errors(tmp_path):
    touch(tmp_path, "only_real/real/a.jpg", "no_classes/x/a.jpg")
    (tmp_path / "only_real" / "fake").mkdir()
    for folder, pattern in (("only_real", "fake"), ("no_classes", "real/"), ("missing", "does not exist")):
        with pytest.raises(ValueError, match=pattern) as info:
            load_labelled_splits(tmp_path / folder)
        assert "\n" not in str(info.value)
    touch(tmp_path, "splits/val/real/a.jpg", "splits/val/fake/b.jpg")
    with pytest.raises(ValueError, match="no train/"):
        load_labelled_splits(tmp_path / "splits")
