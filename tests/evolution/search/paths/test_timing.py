"""The phase timer: nested phases are not counted in the outer one, threads keep theirs."""

import threading
import time

from evolution.search.paths import timing


def test_nested_phase_is_not_counted_in_the_outer_one():
    timer = timing.Timer()
    with timer.phase("train"):
        time.sleep(0.02)
        with timing.phase("compile"):  # found through the thread's active timer
            time.sleep(0.2)
    assert timer.seconds["compile"] >= 0.2
    assert 0.02 <= timer.seconds["train"] < 0.2  # the compile time is left out
    with timing.phase("compile"):  # no active timer any more: nothing is counted
        time.sleep(0.01)
    assert set(timer.seconds) == {"train", "compile"}


def test_each_thread_times_into_its_own_timer():
    timers = [timing.Timer() for _ in range(2)]

    def work(timer, seconds):
        with timer.phase("train"), timing.phase("compile"):
            time.sleep(seconds)

    threads = [
        threading.Thread(target=work, args=(timer, s))
        for timer, s in zip(timers, (0.01, 0.3), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert timers[0].seconds["compile"] < 0.3 <= timers[1].seconds["compile"]
    assert all(timer.seconds["train"] < 0.1 for timer in timers)
