"""core.interrupts.held_interrupt: a Ctrl-C inside the block waits for its end; a second one does not."""

import os
import signal

import pytest

from featurepipe.core.interrupts import held_interrupt


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_is_held_until_the_block_ends():
    before = signal.getsignal(signal.SIGINT)   # default_int_handler, or SIG_IGN under `nohup ... &`
    written = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupt():
            _ctrl_c()
            written.append("leaderboard")   # still runs: the interrupt waits
            written.append("head")
    assert written == ["leaderboard", "head"]
    assert signal.getsignal(signal.SIGINT) is before   # the handler is given back


def test_a_second_ctrl_c_stops_at_once_and_a_quiet_block_raises_nothing():
    written = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupt():
            _ctrl_c()
            written.append("leaderboard")
            _ctrl_c()
            written.append("head")
    assert written == ["leaderboard"]
    with held_interrupt():
        written.append("config")
    assert written == ["leaderboard", "config"]


def test_an_error_inside_is_raised_as_it_is():
    with pytest.raises(ValueError):
        with held_interrupt():
            _ctrl_c()
            raise ValueError("disk full")
