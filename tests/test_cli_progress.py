"""The command line's progress display (`dualanodiff.progress`): plain lines outside a terminal, one per
tenth of the work or every few seconds. The failure contract (one-line errors, exit codes, signals, pipes,
--log-file, plain lines of whole commands) is tests/test_faults.py."""

from __future__ import annotations

from dualanodiff import cli, progress


def test_plain_progress_prints_every_tenth_or_every_few_seconds():
    now, printed = [0.0], []
    bar = progress.PlainProgress("training", 200, printed.append, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] = step * 0.1  # 10 steps per second: 20 s in all
        bar.update(step, note=f"loss {1 / step:.3f}")
    assert len(printed) == 11  # the first step, then every 10 % (20 steps, 2 s)
    assert printed[0] == "training 1/200 (0%) loss 1.000"
    assert printed[1] == "training 20/200 (10%) loss 0.050, 10.00/s, 18 s left"
    assert printed[-1] == "training 200/200 (100%) loss 0.005, 10.00/s"

    slow, printed = progress.PlainProgress("generating", 1000, printed.append, clock=lambda: now[0]), []
    slow.print_line = printed.append
    for done in range(1, 31):
        now[0] = done * 2.0  # a pair every 2 s: 15 s pass long before 10 %
        slow.update(done)
    assert [line.split(" (")[0] for line in printed] == ["generating 1/1000", "generating 9/1000", "generating 17/1000",
                                                         "generating 25/1000"]
    assert printed[1].endswith("0.50/s, 33 min 02 s left")

    unknown, printed = progress.PlainProgress("steps", None, printed.append, clock=lambda: now[0]), []
    unknown.print_line = printed.append
    unknown.update(3)
    assert printed == ["steps 3/?"]


def test_no_progress_when_disabled(capsys):
    with cli.progress_bars(enabled=False) as bars:
        bars("training", 10)(5, 10, "loss 1")
    assert capsys.readouterr().err == ""


def test_the_loss_bar_counts_steps_and_shows_the_loss_averaged_over_recent_steps(recorded_bars):
    advance = progress.loss_bar(recorded_bars, "localization U-Net", 3)
    for loss in (1.0, 0.0, 0.0):
        advance(loss)
    assert recorded_bars.totals == {"localization U-Net": 3}
    assert recorded_bars.updates["localization U-Net"] == [(1, None), (2, None), (3, None)]
    assert recorded_bars.notes["localization U-Net"] == ["loss 1.0000", "loss 0.9500", "loss 0.9025"]


def test_a_cost_estimate_speaks_once_after_its_first_units_and_only_over_the_limit(monkeypatch):
    import itertools
    from types import SimpleNamespace

    from dualanodiff import progress

    clock = itertools.count(0.0, 10.0)
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    said = []
    estimate = progress.CostEstimate(100, said.append, "training (100 steps)", "train.steps (--steps) shortens it", after=3)
    for _ in range(6):
        estimate.advance()
    # the clock starts at the first unit's end (0 s); 3 units later 30 s have passed: 10 s a unit, 1000 s for 100
    assert said == ["training (100 steps) will take about 17 min on this device; train.steps (--steps) shortens it"]
    monkeypatch.setattr(progress, "ESTIMATE_LIMIT", 1e9)
    quiet = []
    estimate = progress.CostEstimate(100, quiet.append, "x", "y", after=3)
    for _ in range(6):
        estimate.advance()
    assert quiet == []


def test_training_and_generation_say_what_they_will_cost(synthetic_root, tiny_run, tmp_path, monkeypatch):
    from dualanodiff import progress
    from dualanodiff.config import Config
    from dualanodiff.generation import generate
    from dualanodiff.training import train

    monkeypatch.setattr(progress, "ESTIMATE_LIMIT", 0.0)
    cfg = Config()
    cfg.data.data, cfg.data.defect, cfg.model.base_model = str(synthetic_root / "nut"), "hole", "tiny-random"
    cfg.model.rank, cfg.model.text_rank = 4, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.device = 7, 1, "cpu"
    said = []
    train(cfg, tmp_path / "run", log=said.append)
    assert [m for m in said if "will take about" in m] == [
        next(m for m in said if m.startswith("training (7 steps) will take about ") and m.endswith("; train.steps (--steps) shortens it"))]
    generating = Config.from_yaml(tiny_run / "config.yaml").generate
    generating.num, generating.batch_size, generating.steps, generating.filter = 7, 2, 2, False
    said.clear()
    generate(tiny_run, tmp_path / "gen", generating, log=said.append)
    assert len([m for m in said if m.startswith("generation (7 pairs) will take about ")]) == 1
