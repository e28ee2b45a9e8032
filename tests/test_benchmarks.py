"""The prepared GPU benchmark: its dry run on the CPU writes every row it will write on the GPU, well formed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common
from gpu_bench import DRY_RUN, Rows, main, read_entries, record
from train_step import CUTS


def _columns(section: str) -> int:
    return _common.table_header(section)[0].count("|") - 1


def test_rows_render_under_results_headers_and_record_into_results(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text(_common.RESULTS.read_text())
    monkeypatch.setattr(_common, "RESULTS", results)
    rows = Rows(tmp_path / "out")
    cells = ["2026-01-01", "GPU", "2.11", "sd15", "dual step b4 bf16", "0.200", "0.100", "2.00", "60.0", "10"]
    rows.add("torch.compile", cells, {})
    rows.note("generate: skipped")
    with rows.jsonl.open("a") as handle:
        handle.write('{"section": "Generation", "cel')  # a line cut off by a kill
    markdown = rows.markdown.read_text()
    assert markdown.startswith("## torch.compile\n\n" + "\n".join(_common.table_header("torch.compile")))
    assert "| " + " | ".join(cells) + " |" in markdown and "- generate: skipped" in markdown
    assert len(read_entries(rows.jsonl)) == 2
    before = results.read_text().splitlines()
    assert record(rows.jsonl) == 1
    after = results.read_text().splitlines()
    assert len(after) == len(before) + 1
    added = after.index("| " + " | ".join(cells) + " |")
    assert after[:added] + after[added + 1 :] == before
    heading = max(i for i in range(added) if after[i].startswith("## "))
    assert after[heading] == "## torch.compile" and not after[added + 1].startswith("|")  # the table's last row


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    entries = read_entries(out / "rows.jsonl")
    assert [e["note"] for e in entries if "note" in e] == []  # nothing skipped, nothing failed
    rows = [e for e in entries if "section" in e]
    assert Counter(e["section"] for e in rows) == {"Training step": 2, "FLOP cuts": 2 * len(CUTS), "Generation": 4,
                                                   "torch.compile": 2}
    markdown = (out / "rows.md").read_text()
    for entry in rows:
        assert len(entry["cells"]) == _columns(entry["section"])
        assert "| " + " | ".join(entry["cells"]) + " |" in markdown

    steps = [e for e in rows if e["section"] == "Training step"]
    assert [e["cells"][3] for e in steps] == ["test b1 bf16", "test b1 bf16 ckpt"]
    for entry in steps:
        assert all(math.isfinite(float(c)) and float(c) > 0 for c in entry["cells"][4:11])  # times and ratios
        assert entry["result"]["official_vs_dual_max_abs_diff"] <= 1e-4  # the official-style harness is the same model
    cuts = [e for e in rows if e["section"] == "FLOP cuts"]
    assert sorted((e["cells"][3], e["cells"][4]) for e in cuts) == sorted(
        (f"test b1 bf16{ckpt}", cut) for ckpt in ("", " ckpt") for cut in CUTS
    )
    assert all(float(e["cells"][6]) > 0 for e in cuts)
    generation = [e["result"] for e in rows if e["section"] == "Generation"]
    assert [(g["scheduler"], g["steps"], g["batch_size"], g["repeats"]) for g in generation] == list(DRY_RUN.cells)
    assert all(g["pairs_per_second"] > 0 for g in generation)
    compiled = [e["cells"][4] for e in rows if e["section"] == "torch.compile"]
    assert compiled[0].startswith("dual step") and compiled[1].startswith("sampling")
    assert f"done: {len(rows)} rows" in (out / "log.txt").read_text()


def test_generate_cells_measures_the_chosen_cells_in_their_order_and_refuses_others(tmp_path, capsys):
    main(["--part", "generate", "--out", str(tmp_path), "--dry-run", "--generate-cells", "pndm:3:2, dpm:2:1"])
    generation = [e["result"] for e in read_entries(tmp_path / "rows.jsonl") if e.get("section") == "Generation"]
    assert [(g["scheduler"], g["steps"], g["batch_size"]) for g in generation] == [("pndm", 3, 2), ("dpm", 2, 1)]
    with pytest.raises(SystemExit) as stopped:
        main(["--part", "generate", "--out", str(tmp_path), "--dry-run", "--generate-cells", "dpm:25:16"])
    assert stopped.value.code == 2 and "--generate-cells: unknown dpm:25:16" in capsys.readouterr().err


def _run_recording(script, argv: list[str], section: str, tmp_path, monkeypatch, capsys) -> tuple[dict, list[str]]:
    """Run a benchmark script's main with `argv` against a copy of RESULTS.md: its printed JSON and the cells of
    the one row it added, checked to sit in the table under ``## <section>`` with that table's columns."""
    import json

    results = tmp_path / "RESULTS.md"
    results.write_text(_common.RESULTS.read_text())
    monkeypatch.setattr(_common, "RESULTS", results)
    before = results.read_text().splitlines()
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    script.main()
    printed = json.loads(capsys.readouterr().out)
    after = results.read_text().splitlines()
    assert len(after) == len(before) + 1
    row = next(line for line in after if line not in before)
    heading = max(i for i in range(after.index(row)) if after[i].startswith("## "))
    assert after[heading] == f"## {section}"
    cells = row.strip("| ").split(" | ")
    assert len(cells) == _columns(section)
    return printed, cells


def test_localizer_benchmark_records_one_row_of_both_layouts(tmp_path, monkeypatch, capsys):
    import localizer

    argv = ["--device", "cpu", "--batch-size", "2", "--size", "32", "--base-width", "2", "--steps", "2"]
    printed, cells = _run_recording(localizer, argv, "Localizer", tmp_path, monkeypatch, capsys)
    assert printed["ratio"] == pytest.approx(printed["contiguous s/step"] / printed["channels-last s/step"])
    assert cells[3] == "b2 32 px w2" and float(cells[6]) > 0


def test_evaluation_workers_benchmark_records_both_ways(tmp_path, monkeypatch, capsys):
    import evaluation_workers

    argv = ["--trainings", "2", "--size", "32", "--steps", "2", "--rounds", "1"]
    printed, cells = _run_recording(evaluation_workers, argv, "Evaluation workers", tmp_path, monkeypatch, capsys)
    assert printed["ratio"] == pytest.approx(printed["one after the other s"] / printed["side by side s"])
    assert cells[3] == f"2 x 2 steps, 32 px, {printed['cores']} cores" and float(cells[5]) > 0


def test_merged_sampling_benchmark_records_both_ways_and_merging_cuts_flops(tmp_path, monkeypatch, capsys):
    import merged_sampling

    argv = ["--config", "test", "--device", "cpu", "--batch-size", "2", "--steps", "2", "--calls", "1"]
    printed, cells = _run_recording(merged_sampling, argv, "Merged adapters at sampling", tmp_path, monkeypatch, capsys)
    assert printed["merged TFLOP/pair-step"] < printed["low-rank TFLOP/pair-step"]  # no low-rank path left
    assert printed["low-rank s/call"] > 0 and printed["merged s/call"] > 0
    assert cells[4] == "dpm 2 b2 fp32"
    assert float(cells[7]) == pytest.approx(printed["low-rank s/call"] / printed["merged s/call"], abs=0.01)
