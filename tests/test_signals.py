"""`deferred_signals`: SIGINT and SIGTERM wait for the work's safe point, or stop at once inside `at_once`;
none is lost; the handlers before are restored. Real signals, sent to this process."""

from __future__ import annotations

import os
import pickle
import signal
import threading

import pytest

from dualanodiff.signals import Stopped, deferred_signals


def send(number: int) -> None:
    os.kill(os.getpid(), number)  # handled before the next line runs: signals reach the main thread at once


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_waits_for_the_safe_point_and_the_handlers_are_restored(number):
    before = signal.getsignal(number)
    done = []
    with pytest.raises(Stopped) as stopped:
        with deferred_signals() as stop:
            send(number)
            done.append("after the signal")  # the work goes on to its safe point
            assert stop() == number
            raise Stopped(stop(), "at step 3; continue with --resume")
    assert done == ["after the signal"] and signal.getsignal(number) is before
    assert (stopped.value.number, str(stopped.value)) == (number, f"stopped by {signal.Signals(number).name} at step 3; "
                                                                  "continue with --resume")
    assert isinstance(stopped.value, KeyboardInterrupt)  # code that cleans up on Ctrl-C does so here too


def test_inside_at_once_a_signal_stops_where_it_lands():
    reached = []
    with pytest.raises(Stopped, match="^stopped by SIGTERM before anything was written$"):
        with deferred_signals() as stop, stop.at_once("before anything was written"):
            send(signal.SIGTERM)
            reached.append("after the signal")
    assert reached == []


def test_at_once_after_a_recorded_signal_stops_on_entry_and_the_first_signal_counts():
    with pytest.raises(Stopped) as stopped:
        with deferred_signals() as stop:
            send(signal.SIGTERM)
            send(signal.SIGINT)
            with stop.at_once("dropped"):
                pytest.fail("entered at_once after a stop")
    assert stopped.value.number == signal.SIGTERM


def test_a_signal_left_unanswered_is_raised_when_the_block_ends():
    with pytest.raises(Stopped, match="^stopped by SIGINT$"):
        with deferred_signals():
            send(signal.SIGINT)
    with deferred_signals() as stop:  # no signal: nothing raised
        pass
    assert stop() == 0


def test_outside_the_main_thread_nothing_is_caught():
    seen = []

    def work() -> None:
        with deferred_signals() as stop:
            seen.append(stop())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [0]


def test_stopped_survives_pickling():
    copy = pickle.loads(pickle.dumps(Stopped(signal.SIGTERM, "after its jobs saved their work")))
    assert (copy.number, str(copy)) == (signal.SIGTERM, "stopped by SIGTERM after its jobs saved their work")
