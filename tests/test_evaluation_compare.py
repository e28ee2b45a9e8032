"""`evaluate_generators`: which defect types are compared, and what is said about what is not."""

from __future__ import annotations

import math

import pytest

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import few_shot_split, load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.evaluation import evaluate_generators
from dualanodiff.pairs import PairWriter


@pytest.fixture(scope="module")
def roots(tmp_path_factory, synthetic_root):
    """``full``: the few-shot pairs of every nut defect type copied; ``partial``: crack and hole only."""
    category = open_category(synthetic_root / "nut")
    base = tmp_path_factory.mktemp("compare")
    for name, defects in (("full", list(category.defects)), ("partial", ["crack", "hole"])):
        for defect in defects:
            writer = PairWriter(base / name, "nut", defect)
            for attempt, pair in enumerate(few_shot_split(category.defects[defect])[0]):
                writer.write(load_image(pair.image), load_mask(pair.mask), None, {"attempt": attempt, "seed": 0})
    return {"full": base / "full", "partial": base / "partial"}


def test_only_defect_types_every_generator_has_are_compared(synthetic_root, roots):
    cfg = EvaluateConfig(epochs=1, batch_size=4, resolution=64, base_width=4)
    results = evaluate_generators(synthetic_root / "nut", roots, cfg, classification=False, device="cpu")
    assert results["defects"] == ["crack", "hole"]
    assert any("left out" in note and "scratch, stain" in note for note in results["notes"])
    full = results["generators"][0]
    assert full["pairs"] == {"crack": 2, "hole": 2} and set(full["per_defect"]) == {"crack", "hole"}
    assert results["protocol"]["test_images"] == {"crack": 4, "hole": 4, "good": 6}
    assert math.isnan(full["metrics"]["accuracy"]) and math.isnan(full["metrics"]["is"])


def test_one_defect_type_skips_classification_with_a_note(synthetic_root, roots):
    cfg = EvaluateConfig(epochs=1, batch_size=4, resolution=64, base_width=4)
    results = evaluate_generators(
        synthetic_root / "nut", {"full": roots["full"]}, cfg, defects=["stain"], device="cpu"
    )
    assert results["defects"] == ["stain"]
    assert "classification not computed: it needs at least 2 defect types" in results["notes"]
    assert results["protocol"]["classification"] == "not run"


def test_a_requested_defect_type_missing_from_a_generator_is_a_user_error(synthetic_root, roots):
    with pytest.raises(UserError, match=r"partial/nut/stain: no generated pairs for defect type 'stain'"):
        evaluate_generators(synthetic_root / "nut", roots, EvaluateConfig(resolution=64), defects=["stain"])
