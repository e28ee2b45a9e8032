"""`dualanodiff synth` and `dualanodiff info`, and every kind of bad dataset through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from dualanodiff.cli import main


@pytest.fixture
def nut(tmp_path, synthetic_root):
    """A private copy of the synthetic nut category, free to damage."""
    return shutil.copytree(synthetic_root / "nut", tmp_path / "nut")


def test_synth_writes_and_refuses_to_overwrite(tmp_path, run_cli):
    out = tmp_path / "data"
    code, _, err = run_cli("synth", out, "--size", "64", "--per-defect", "2", "--good", "1", "--seed", "3")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["nut", "pill", "weave"]
    assert len(list((out / "weave" / "ground_truth" / "cut").iterdir())) == 2
    before = (out / "nut" / "test" / "hole" / "001.png").read_bytes()

    code, _, err = run_cli("synth", out, "--size", "64")
    assert code == 2 and "--force" in err and str(out) in err

    code, _, err = run_cli("synth", out, "--size", "64", "--per-defect", "2", "--good", "1", "--seed", "3", "--force")
    assert code == 0, err
    assert (out / "nut" / "test" / "hole" / "001.png").read_bytes() == before


def test_info_json_is_one_object_with_the_split(nut, run_cli):
    for index in (4, 5):  # leave 4 scratch pairs: floor -> 1 training pair, ceil -> 2
        (nut / "test" / "scratch" / f"00{index}.png").unlink()
    code, out, err = run_cli("info", nut, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert out.count("\n") == 1
    assert record == {
        "category": "nut",
        "defects": {
            "crack": {"train": ["000", "001"], "test": ["002", "003", "004", "005"], "empty_masks": []},
            "hole": {"train": ["000", "001"], "test": ["002", "003", "004", "005"], "empty_masks": []},
            "scratch": {"train": ["000"], "test": ["001", "002", "003"], "empty_masks": []},
            "stain": {"train": ["000", "001"], "test": ["002", "003", "004", "005"], "empty_masks": []},
        },
        "good_train": 6,
        "good_test": 6,
    }
    code, out, _ = run_cli("info", nut, "--json", "--split-rounding", "ceil")
    assert json.loads(out)["defects"]["scratch"] == {"train": ["000", "001"], "test": ["002", "003"], "empty_masks": []}


def test_info_table(synthetic_root, run_cli):
    code, out, err = run_cli("info", synthetic_root / "weave")
    assert code == 0, err
    for word in ("weave", "texture", "64x64", "cut", "hole", "stain", "thread", "000 001", "002 003 004 005"):
        assert word in out


def _missing_dir(nut):
    return nut / "absent", nut / "absent"


def _mask_missing(nut):
    (nut / "ground_truth" / "hole" / "003_mask.png").unlink()
    return nut, nut / "test" / "hole" / "003.png"


def _mask_wrong_size(nut):
    mask = nut / "ground_truth" / "crack" / "002_mask.png"
    Image.open(mask).resize((32, 64)).save(mask)
    return nut, mask


def _corrupt_image(nut):
    image = nut / "test" / "stain" / "001.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return nut, image


def _truncated_image(nut):
    image = nut / "train" / "good" / "002.png"
    image.write_bytes(image.read_bytes()[:200])
    return nut, image


def _empty_defect_folder(nut):
    (nut / "test" / "dent").mkdir()
    return nut, nut / "test" / "dent"


def _non_image_file(nut):
    (nut / "test" / "scratch" / "notes.txt").write_text("hello")
    return nut, nut / "test" / "scratch" / "notes.txt"


def _too_few_pairs(nut):
    for index in range(2, 6):
        (nut / "test" / "hole" / f"00{index}.png").unlink()
    return nut, nut / "test" / "hole"


def _no_known_layout(nut):
    shutil.rmtree(nut / "test")
    return nut, nut


def _folder_without_masks(nut):
    (nut / "images").mkdir()
    shutil.copy(nut / "train" / "good" / "000.png", nut / "images" / "000.png")
    shutil.rmtree(nut / "test")
    return nut, nut / "masks"


@pytest.mark.parametrize(
    "damage",
    [
        _missing_dir,
        _mask_missing,
        _mask_wrong_size,
        _corrupt_image,
        _truncated_image,
        _empty_defect_folder,
        _non_image_file,
        _too_few_pairs,
        _no_known_layout,
        _folder_without_masks,
    ],
)
def test_bad_dataset_is_one_line_and_exit_code_2(nut, damage, run_cli):
    target, culprit = damage(nut)
    code, out, err = run_cli("info", target)
    assert code == 2
    assert out == ""
    assert err.strip().count("\n") == 0, err
    assert str(culprit) in err.replace("\n", "")
    assert "Traceback" not in err


def test_hidden_files_are_ignored(nut, run_cli):
    (nut / "test" / "scratch" / ".DS_Store").write_bytes(b"\0\1")
    (nut / "train" / "good" / "._000.png").write_bytes(b"\0\1")
    code, _, err = run_cli("info", nut, "--json")
    assert code == 0, err


def test_debug_shows_the_traceback(tmp_path):
    from dualanodiff.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "info", str(tmp_path / "absent")])


def test_exit_codes_of_commands_reach_the_shell(monkeypatch):
    """typer returns Exit codes in non-standalone mode; `main` must pass them on, not exit 0."""
    import typer

    from dualanodiff import cli

    @cli.app.command("exit-probe", hidden=True)
    def exit_probe(code: int) -> None:
        raise typer.Exit(code)

    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["exit-probe", "3"])
        assert exit_info.value.code == 3
        cli.main(["exit-probe", "0"])  # success returns normally
    finally:
        cli.app.registered_commands.pop()
