"""The stand-in's tail settings: model runs in arrival order (--standin_model_run_slots: the slots, the flag,
a live server) and TensorFlow's thread spinning, off unless --standin_tensorflow_thread_spinning."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.tfs_standin.core import session_options
from serving.tfs_standin.flags import FlagError, ServerOptions, parse_flags
from serving.tfs_standin.predict import DirectRunner
from serving.tfs_standin.run_slots import RunSlots
from tests.standin_helpers import (
    expected_outputs,
    outputs,
    running,
    server_options,
    stubs_for,
    tf_model_copy,  # noqa: F401 - fixture
    wait_for,
)


def _queue_in_order(slots: RunSlots, names: list[str], granted: list[str], pool: ThreadPoolExecutor) -> list:
    """Start one waiter per name, each queued only after the one before it is (observed, not slept on)."""

    def take(name: str) -> None:
        assert slots.acquire()
        granted.append(name)
        slots.release()

    futures = []
    for count, name in enumerate(names, start=1):
        futures.append(pool.submit(take, name))
        wait_for(lambda c=count: slots.waiting() == c, what=f"{name} to queue")
    return futures


def test_slots_are_granted_in_arrival_order() -> None:
    slots = RunSlots(1)
    assert slots.acquire()
    granted: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        futures = _queue_in_order(slots, ["first", "second", "third", "fourth"], granted, pool)
        assert granted == []  # nobody runs while the slot is held
        slots.release()
        for future in futures:
            future.result(30)
    assert granted == ["first", "second", "third", "fourth"]
    assert slots.waiting() == 0


def test_a_released_slot_goes_to_the_oldest_waiter_not_to_a_newcomer() -> None:
    slots = RunSlots(1)
    assert slots.acquire()
    holding, done = threading.Event(), threading.Event()

    def waiter() -> None:
        assert slots.acquire()
        holding.set()
        done.wait(30)
        slots.release()

    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(waiter)
        wait_for(lambda: slots.waiting() == 1, what="the waiter to queue")
        slots.release()
        assert holding.wait(30)
        # The slot was handed to the waiter: a newcomer that will not wait gets nothing.
        assert not slots.acquire(deadline=time.monotonic())
        done.set()
        queued.result(30)
    assert slots.acquire(deadline=time.monotonic())


def test_two_slots_let_two_callers_in_at_once() -> None:
    slots = RunSlots(2)
    assert slots.acquire() and slots.acquire(deadline=time.monotonic())
    assert not slots.acquire(deadline=time.monotonic())
    slots.release()
    assert slots.acquire(deadline=time.monotonic())


def test_a_waiter_whose_deadline_passes_leaves_the_queue_and_the_slot_stays_usable() -> None:
    slots = RunSlots(1)
    assert slots.acquire()
    assert not slots.acquire(deadline=time.monotonic() + 0.05)
    assert slots.waiting() == 0
    slots.release()
    assert slots.acquire(deadline=time.monotonic())


@pytest.mark.parametrize("count", [0, -1])
def test_slots_need_at_least_one(count: int) -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        RunSlots(count)


def test_the_run_slots_flag_is_off_by_default_and_takes_a_count(tmp_path: Path) -> None:
    base = f"--model_base_path={tmp_path}"
    assert parse_flags([base]).standin_model_run_slots == ServerOptions().standin_model_run_slots == 0
    assert parse_flags([base, "--standin_model_run_slots=3"]).standin_model_run_slots == 3
    with pytest.raises(FlagError, match="--standin_model_run_slots=-1: must be at least 0"):
        parse_flags([base, "--standin_model_run_slots=-1"])
    with pytest.raises(FlagError, match="expected an integer"):
        parse_flags([base, "--standin_model_run_slots=many"])


def test_thread_spinning_is_off_unless_asked_for(tmp_path: Path) -> None:
    base = f"--model_base_path={tmp_path}"
    assert session_options(parse_flags([base])).config_proto().experimental.disable_thread_spinning
    spinning = session_options(parse_flags([base, "--standin_tensorflow_thread_spinning=true"]))
    assert not spinning.config_proto().experimental.disable_thread_spinning
    # The flag leaves the rest of the session configuration as it was.
    pools = parse_flags([base, "--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=3"])
    config = session_options(pools).config_proto()
    assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (1, 3)


def test_a_session_config_file_cannot_turn_spinning_back_on_without_the_flag(tmp_path: Path) -> None:
    # ConfigProto is proto3: "disable_thread_spinning: false" in a file reads as unset, so only the flag restores it.
    config_file = tmp_path / "session.config"
    config_file.write_text("experimental { disable_thread_spinning: false }\nallow_soft_placement: true\n")
    base = [f"--model_base_path={tmp_path}", f"--tensorflow_session_config_file={config_file}"]
    assert session_options(parse_flags(base)).config_proto().experimental.disable_thread_spinning
    restored = parse_flags([*base, "--standin_tensorflow_thread_spinning"])
    assert not session_options(restored).config_proto().experimental.disable_thread_spinning


def _runner(server: object) -> DirectRunner:
    runner = server.core.runner  # type: ignore[attr-defined]
    assert isinstance(runner, DirectRunner)
    return runner


def test_a_server_builds_the_slots_its_flag_asks_for(tf_model_copy: Path) -> None:  # noqa: F811
    with running(server_options(tf_model_copy, standin_model_run_slots=3), wait=False) as server:
        slots = _runner(server).slots
        assert slots is not None and slots.slots == 3
    with running(server_options(tf_model_copy), wait=False) as server:
        assert _runner(server).slots is None


def test_calls_wait_their_turn_behind_a_held_slot_then_get_the_models_answers(
    tf_model_copy: Path, test_images: tuple[np.ndarray, np.ndarray]  # noqa: F811
) -> None:
    images = test_images[0][:6]
    expected = expected_outputs(tf_model_copy / "1", images)
    with running(server_options(tf_model_copy, standin_model_run_slots=1)) as server, stubs_for(server) as stubs:
        slots = _runner(server).slots
        assert slots is not None
        assert slots.acquire()  # as if a long run held the only slot
        with ThreadPoolExecutor(len(images)) as pool:
            calls = [pool.submit(stubs.predict, images[i : i + 1]) for i in range(len(images))]
            wait_for(lambda: slots.waiting() == len(images), what="every call to wait for the slot")
            assert not any(call.done() for call in calls)
            slots.release()
            answers = [outputs(call.result(60)) for call in calls]
        for i, answer in enumerate(answers):
            for alias, values in expected.items():
                np.testing.assert_allclose(answer[alias], values[i : i + 1], rtol=1e-5, atol=1e-6)


def test_a_call_whose_deadline_passes_while_it_waits_gets_deadline_exceeded_and_the_server_goes_on(
    tf_model_copy: Path, test_images: tuple[np.ndarray, np.ndarray]  # noqa: F811
) -> None:
    image = test_images[0][:1]
    with running(server_options(tf_model_copy, standin_model_run_slots=1)) as server, stubs_for(server) as stubs:
        slots = _runner(server).slots
        assert slots is not None and slots.acquire()
        try:
            with pytest.raises(grpc.RpcError) as caught:
                stubs.predict(image, timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: slots.waiting() == 0, what="the expired call to leave the queue")
        finally:
            slots.release()
        assert outputs(stubs.predict(image))  # the slot was not lost with the expired call
