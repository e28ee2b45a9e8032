"""The generated-pairs layout: resumable writes, manifests, contact sheets, discovery."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualanodiff import io as atomic_io
from dualanodiff import pairs
from dualanodiff.errors import UserError
from dualanodiff.io import save_png
from dualanodiff.masks import mask_overlay
from dualanodiff.pairs import PairWriter, contact_sheet, discover_generated, read_pairs


def make_pair(seed: int, size: int = 24, with_part: bool = True):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[seed % 5 : seed % 5 + 8, 4:14] = True
    part = np.where(mask[..., None], image, 128).astype(np.uint8) if with_part else None
    return image, mask, part


def write_pairs(writer: PairWriter, seeds: range) -> list[int]:
    return [writer.write(*make_pair(seed), {"attempt": seed, "seed": 1000 + seed}) for seed in seeds]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def strict_rows(path: Path) -> list[dict]:
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def test_write_lays_out_pngs_and_a_manifest_row_per_pair(tmp_path):
    writer = PairWriter(tmp_path, "hazelnut", "crack")
    assert writer.dir == tmp_path / "hazelnut" / "crack"
    assert writer.kept() == [] and writer.attempts_done() == 0
    image, mask, part = make_pair(0)
    record = {"attempt": 0, "seed": np.int64(7), "area": np.float32(0.25), "consistency": float("nan")}
    assert writer.write(image, mask, part, record) == 0
    assert np.array_equal(np.asarray(Image.open(writer.dir / "image" / "0000.png")), image)
    stored_mask = Image.open(writer.dir / "mask" / "0000.png")
    assert stored_mask.mode == "L" and set(np.unique(stored_mask)) == {0, 255}
    assert np.array_equal(np.asarray(stored_mask) == 255, mask)
    assert np.array_equal(np.asarray(Image.open(writer.dir / "part" / "0000.png")), part)
    (row,) = strict_rows(writer.dir / "manifest.jsonl")
    assert row == {"index": 0, "attempt": 0, "seed": 7, "area": 0.25, "consistency": None,
                   "image": "image/0000.png", "mask": "mask/0000.png", "part": "part/0000.png"}
    assert writer.kept() == [row]


def test_reopening_and_writing_more_keeps_earlier_files_byte_identical(tmp_path):
    assert write_pairs(PairWriter(tmp_path, "cat", "hole"), range(3)) == [0, 1, 2]
    folder = tmp_path / "cat" / "hole"
    before, manifest_before = snapshot(folder), (folder / "manifest.jsonl").read_text()
    resumed = PairWriter(tmp_path, "cat", "hole")
    assert resumed.attempts_done() == 3
    assert write_pairs(resumed, range(3, 5)) == [3, 4]
    after = snapshot(folder)
    assert {name: after[name] for name in before} == before
    assert len(after) == 3 * 5
    assert (folder / "manifest.jsonl").read_text().startswith(manifest_before)
    assert [row["index"] for row in resumed.kept()] == [0, 1, 2, 3, 4]


def test_orphan_files_of_a_killed_run_are_ignored_then_overwritten(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(2))
    orphan = np.zeros((24, 24, 3), np.uint8)  # a run killed after its PNGs, before its manifest row
    save_png(writer.dir / "image" / "0002.png", orphan)
    save_png(writer.dir / "mask" / "0002.png", np.zeros((24, 24), np.uint8))
    save_png(writer.dir / "part" / "0002.png", orphan)
    assert [row["index"] for row in writer.kept()] == [0, 1]
    assert len(read_pairs(writer.dir)) == 2
    image, mask, _ = make_pair(9)
    assert writer.write(image, mask, None, {"attempt": 2, "seed": 9}) == 2
    assert np.array_equal(np.asarray(Image.open(writer.dir / "image" / "0002.png")), image)
    assert not (writer.dir / "part" / "0002.png").exists()  # the orphan part belongs to no pair
    assert writer.kept()[-1]["part"] is None


def test_rows_with_missing_files_are_ignored_and_their_index_reused(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(3))
    (writer.dir / "mask" / "0001.png").unlink()
    assert [row["index"] for row in writer.kept()] == [0, 2]
    assert writer.attempts_done() == 3  # its attempt was spent all the same
    assert writer.write(*make_pair(5), {"attempt": 3, "seed": 5}) == 1
    rows = strict_rows(writer.dir / "manifest.jsonl")
    assert sorted(row["index"] for row in rows) == [0, 1, 2]
    assert [row["attempt"] for row in writer.kept()] == [0, 3, 2]


def test_indices_grow_past_four_digits(tmp_path, monkeypatch):
    writer = PairWriter(tmp_path, "cat", "hole")
    monkeypatch.setattr(writer, "kept", lambda: [{"index": i} for i in range(10000)])
    assert writer.write(*make_pair(0), {"attempt": 10000, "seed": 0}) == 10000
    assert (writer.dir / "image" / "10000.png").is_file() and (writer.dir / "mask" / "10000.png").is_file()


def test_rejected_rows_count_towards_attempts(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(1))
    writer.reject({"attempt": 1, "seed": 11, "verdict": "empty"})
    writer.reject({"attempt": 4, "seed": 14, "verdict": "off_object", "area": np.float64(0.01)})
    assert writer.attempts_done() == 5
    assert [row["verdict"] for row in strict_rows(writer.dir / "rejected.jsonl")] == ["empty", "off_object"]
    assert len(writer.kept()) == 1


def test_records_missing_required_keys_are_refused(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        writer.write(*make_pair(0), {"attempt": 0})
    with pytest.raises(ValueError, match=r"may not set \['index'\]"):
        writer.write(*make_pair(0), {"attempt": 0, "seed": 0, "index": 3})
    with pytest.raises(ValueError, match=r"missing \['verdict'\]"):
        writer.reject({"attempt": 0})
    image, mask, _ = make_pair(0)
    with pytest.raises(ValueError, match="mask"):
        writer.write(image, mask.astype(np.uint8), None, {"attempt": 0, "seed": 0})
    assert sorted(p.name for p in writer.dir.iterdir()) == [".writer.lock", "manifest.jsonl"]
    assert writer.kept() == [] and writer.attempts_done() == 0


def test_a_corrupt_manifest_line_is_a_user_error_naming_the_line(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(1))
    with open(writer.dir / "manifest.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(UserError, match=r"manifest.jsonl:2"):
        writer.kept()


def test_contact_sheet_tiles_image_overlay_and_part(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(2))
    image, mask, _ = make_pair(2)
    writer.write(image, mask, None, {"attempt": 2, "seed": 2})
    write_pairs(writer, range(3, 5))
    path = writer.write_contact_sheet(max_pairs=3, tile=24, margin=4)
    assert path == writer.dir / "contact_sheet.png"
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (3 * (24 + 4) + 4, 3 * (24 + 4) + 4, 3)
    rows, step = [make_pair(0), make_pair(1), (image, mask, None)], 28
    for r, (image_r, mask_r, part_r) in enumerate(rows):
        top = 4 + r * step
        tiles = [sheet[top : top + 24, 4 + c * step : 4 + c * step + 24] for c in range(3)]
        assert np.array_equal(tiles[0], image_r)
        assert np.array_equal(tiles[1], mask_overlay(image_r, mask_r))
        assert np.array_equal(tiles[2], np.full((24, 24, 3), 128) if part_r is None else part_r)
    assert (sheet[:4] == 255).all() and (sheet[:, :4] == 255).all() and (sheet[:, 28:32] == 255).all()


def test_contact_sheet_resizes_tiles_and_shows_grey_when_nothing_was_kept():
    image = np.full((48, 48, 3), 200, np.uint8)
    sheet = contact_sheet([(image, np.zeros((48, 48), bool), image)] * 2, tile=16, margin=2)
    assert sheet.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert (sheet[2:18, 2:18] == 200).all()
    empty = contact_sheet([], tile=16, margin=2)
    assert empty.shape == (18 + 2, 3 * 18 + 2, 3) and (empty[2:18, 2:18] == 128).all()


def test_read_pairs_follows_the_manifest_in_index_order(tmp_path):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(3))
    assert read_pairs(writer.dir) == [
        (writer.dir / "image" / f"000{i}.png", writer.dir / "mask" / f"000{i}.png") for i in range(3)
    ]


def test_discover_and_read_a_hand_made_folder_without_manifest(tmp_path):
    grey = np.full((8, 8, 3), 90, np.uint8)
    binary = np.zeros((8, 8), np.uint8)
    for category, defect, images, masks in [
        ("screw", "scratch", ["img10.png", "img2.PNG", "img1.jpg", "lonely.png"],
         ["img1.png", "img2_mask.png", "img10.png"]),
        ("carpet", "hole", ["a.png"], ["a.png"]),
    ]:
        for name in images:
            save_png(tmp_path / category / defect / "image" / name, grey)
        for name in masks:
            save_png(tmp_path / category / defect / "mask" / name, binary)
    save_png(tmp_path / "screw" / "half" / "image" / "x.png", grey)  # no mask/ folder: not a pair folder
    (tmp_path / "notes.txt").write_text("not a category")
    found = discover_generated(tmp_path)
    assert found == {
        ("carpet", "hole"): tmp_path / "carpet" / "hole",
        ("screw", "scratch"): tmp_path / "screw" / "scratch",
    }
    folder = found[("screw", "scratch")]
    assert read_pairs(folder) == [
        (folder / "image" / "img1.jpg", folder / "mask" / "img1.png"),
        (folder / "image" / "img2.PNG", folder / "mask" / "img2_mask.png"),
        (folder / "image" / "img10.png", folder / "mask" / "img10.png"),
    ]


def test_mismatched_names_and_missing_roots_are_user_errors(tmp_path):
    save_png(tmp_path / "image" / "img_1.png", np.zeros((4, 4, 3), np.uint8))
    save_png(tmp_path / "mask" / "mask_1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UserError, match="mask"):
        read_pairs(tmp_path)
    with pytest.raises(UserError, match="nowhere"):
        discover_generated(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- one writer, no orphans


def test_a_second_writer_is_refused_at_once_until_the_first_closes(tmp_path):
    first = PairWriter(tmp_path, "cat", "hole")
    write_pairs(first, range(1))
    with pytest.raises(UserError, match=r"cat/hole: another writer is adding pairs here \(pid \d+ on .* since "):
        PairWriter(tmp_path, "cat", "hole")
    with PairWriter(tmp_path, "cat", "crack"):  # another defect type is another folder
        pass
    first.close()
    with PairWriter(tmp_path, "cat", "hole") as second:
        assert [row["index"] for row in second.kept()] == [0]
    PairWriter(tmp_path, "cat", "hole").close()  # released by the with-block


def test_the_holder_is_named_briefly_even_with_a_long_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/opt/ray/default_worker.py", *["--node-option=value"] * 40])
    with PairWriter(tmp_path, "cat", "hole"), pytest.raises(UserError) as refused:
        PairWriter(tmp_path, "cat", "hole")
    holder = str(refused.value).split("(", 1)[1].split("); wait")[0]
    assert holder.split(": ", 1)[1].startswith("default_worker.py --node-option=value") and holder.endswith("...")
    assert len(holder) < 200


HOLD_FOLDER = """
import sys
from dualanodiff.pairs import PairWriter
writer = PairWriter(sys.argv[1], "cat", "hole")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_writer_in_another_process_holds_the_folder_until_it_ends(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(UserError, match=rf"another writer is adding pairs here \(pid {holder.pid} on "):
            PairWriter(tmp_path, "cat", "hole")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    PairWriter(tmp_path, "cat", "hole").close()  # a process that ended holds nothing


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def pair_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".writer.lock")


@pytest.mark.parametrize("failing", ["mask", "part", "manifest"])
def test_a_write_failing_on_a_full_disk_leaves_no_orphan(tmp_path, monkeypatch, failing):
    writer = PairWriter(tmp_path, "cat", "hole")
    write_pairs(writer, range(2))
    before, manifest = pair_files(writer.dir), (writer.dir / "manifest.jsonl").read_text()
    real_save = pairs.save_png

    def save_until(path, array):
        if failing in ("mask", "part") and path.parent.name == failing:
            disk_full()
        real_save(path, array)

    monkeypatch.setattr(pairs, "save_png", save_until)
    if failing == "manifest":
        monkeypatch.setattr(pairs, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_pairs(writer, range(2, 3))
    assert pair_files(writer.dir) == before and (writer.dir / "manifest.jsonl").read_text() == manifest
    monkeypatch.undo()
    assert write_pairs(writer, range(3, 4)) == [2]  # space again: the index is taken as if nothing happened


def test_an_atomic_write_failing_midway_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    real_fdopen = atomic_io.os.fdopen

    def half_written(fd, mode):
        handle = real_fdopen(fd, mode)
        handle.write = lambda data: (handle.raw.write(data[: len(data) // 2]), disk_full())
        return handle

    target = tmp_path / "image" / "0000.png"
    save_png(target, np.zeros((4, 4, 3), np.uint8))
    old = target.read_bytes()
    monkeypatch.setattr(atomic_io.os, "fdopen", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_png(target, np.ones((4, 4, 3), np.uint8))
    assert [p.name for p in target.parent.iterdir()] == ["0000.png"] and target.read_bytes() == old


def test_orphans_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    with PairWriter(tmp_path, "cat", "hole") as writer:
        write_pairs(writer, range(2))
    folder = writer.dir
    for name in ("image/0002.png", "mask/0002.png", "part/0005.png", "image/.0003.png.x1.tmp", ".manifest.jsonl.x2.tmp"):
        (folder / name).write_bytes(b"left by a killed writer")
    (folder / "image" / "notes.txt").write_text("not a pair file: kept")
    with PairWriter(tmp_path, "cat", "hole") as writer:
        assert [row["index"] for row in writer.kept()] == [0, 1]
    assert pair_files(folder) == sorted(
        ["manifest.jsonl", "image/notes.txt", *[f"{kind}/000{i}.png" for kind in ("image", "mask", "part") for i in (0, 1)]]
    )


def test_a_killed_first_pair_is_cleaned_too_but_a_foreign_folder_is_left_alone(tmp_path):
    PairWriter(tmp_path, "cat", "hole").close()  # a new folder gets its (empty) manifest at once
    save_png(tmp_path / "cat" / "hole" / "image" / "0000.png", np.zeros((4, 4, 3), np.uint8))
    PairWriter(tmp_path, "cat", "hole").close()
    assert pair_files(tmp_path / "cat" / "hole") == ["manifest.jsonl"]

    save_png(tmp_path / "other" / "hole" / "image" / "0000.png", np.zeros((4, 4, 3), np.uint8))  # another tool's
    PairWriter(tmp_path, "other", "hole").close()
    assert pair_files(tmp_path / "other" / "hole") == ["image/0000.png"]


def test_clear_empties_the_folder_and_keeps_the_lock(tmp_path):
    with PairWriter(tmp_path, "cat", "hole") as writer:
        write_pairs(writer, range(2))
        writer.write_contact_sheet()
        writer.clear()
        assert pair_files(writer.dir) == ["manifest.jsonl"] and writer.kept() == []
        with pytest.raises(UserError, match="another writer"):
            PairWriter(tmp_path, "cat", "hole")
        assert write_pairs(writer, range(1)) == [0]


def test_check_settings_names_what_changed_and_passes_on_the_same(tmp_path):
    from dualanodiff.errors import OtherSettings

    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    with PairWriter(tmp_path, "nut", "hole") as writer:
        writer.check_settings({"steps": 25})  # an empty folder takes any settings
        writer.write(image, mask, None, {"attempt": 0, "seed": 0, "steps": 25, "scheduler": "dpm"})
        writer.check_settings({"steps": 25, "scheduler": "dpm"})
        with pytest.raises(OtherSettings, match=r"other settings \(steps 25 -> 50\).*--force"):
            writer.check_settings({"steps": 50, "scheduler": "dpm"})
