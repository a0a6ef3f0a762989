"""The stop request a `--workers` launcher hands its workers through the run folder, and the
callback that acts on it only on log steps (tests/reliability/test_run_records.py runs it on Ray)."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from selfflow.platform.train import interrupts
from selfflow.platform.train.interrupts import RunInterrupted, StopOnSignal


def test_a_request_is_read_acknowledged_and_cleared(tmp_path):
    assert interrupts.requested_stop(tmp_path) is None and interrupts.stopped_at_step(tmp_path) is None
    interrupts.request_stop(tmp_path, signal.SIGTERM)
    assert interrupts.requested_stop(tmp_path) == signal.SIGTERM
    assert interrupts.stopped_at_step(tmp_path) is None  # asked, not yet stopped
    interrupts.acknowledge_stop(tmp_path, 12)
    assert interrupts.stopped_at_step(tmp_path) == 12 and interrupts.requested_stop(tmp_path) == signal.SIGTERM
    interrupts.clear_stop_request(tmp_path)
    assert interrupts.requested_stop(tmp_path) is None
    interrupts.clear_stop_request(tmp_path)  # nothing to clear is fine


def test_an_unreadable_request_still_stops(tmp_path):
    (tmp_path / interrupts.STOP_REQUEST).write_text('{"signal": "SIGIN')
    assert interrupts.requested_stop(tmp_path) == signal.SIGTERM
    (tmp_path / interrupts.STOP_REQUEST).write_text('["SIGINT"]')
    assert interrupts.requested_stop(tmp_path) == signal.SIGTERM


def _trainer(step: int, tmp_path):
    config = SimpleNamespace(log_every=5, steps=100, checkpoint_every=0)
    return SimpleNamespace(step=step, config=config, rank=0, world_size=1, checkpoint_dir=tmp_path / "checkpoints",
                           checkpointed_step=None)


def test_workers_act_on_a_request_at_log_steps_only(tmp_path):
    stop = StopOnSignal(tmp_path)
    stop.on_step_end(_trainer(5, tmp_path), {})  # no request: nothing happens
    interrupts.request_stop(tmp_path, signal.SIGINT)
    stop.on_step_end(_trainer(7, tmp_path), {})  # not a log step: no read, no stop
    with pytest.raises(RunInterrupted) as stopped:
        stop.on_step_end(_trainer(10, tmp_path), {})
    assert stopped.value.signum == signal.SIGINT and stopped.value.step == 10
    assert stopped.value.checkpoint is None  # checkpoint_every = 0: the run writes none
    stop.on_step_end(_trainer(100, tmp_path), {})  # the last step ends the run anyway
