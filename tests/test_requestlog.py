"""The request log: every sampled request written once, bounded, and failures counted
instead of raised, with real files, a real FIFO and /dev/full (no mocks)."""

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tidegate.requestlog import FILENAME, RequestLog, RequestLogConfig, timestamp


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def entry(i: int, **extra: object) -> dict[str, object]:
    return {
        "time": timestamp(),
        "request_id": f"req-{i:06d}",
        "model": "iris",
        "version": 3,
        "variant": "canary",
        "latency_ms": 1.25,
        "status": 200,
        "outcome": "ok",
        **extra,
    }


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def make_log() -> Iterator[Callable[..., RequestLog]]:
    logs: list[RequestLog] = []

    def make(directory: Path, **options: object) -> RequestLog:
        log = RequestLog(RequestLogConfig(directory=directory, **options))  # type: ignore[arg-type]
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close(timeout=1.0)


def test_every_request_is_written_once_and_reads_back_equal(tmp_path, make_log):
    log = make_log(tmp_path)
    expected = [entry(i) for i in range(4000)]

    def feed(part: list[dict[str, object]]) -> None:
        for item in part:
            assert log.sampled()
            log.record(item)

    threads = [threading.Thread(target=feed, args=(expected[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    lines = read_lines(tmp_path / FILENAME)
    assert sorted(lines, key=lambda line: str(line["request_id"])) == expected
    assert (log.written, log.dropped_full, log.dropped_error) == (4000, 0, 0)


def test_sampling_draws_the_configured_fraction(tmp_path, make_log):
    log = make_log(tmp_path, sample=0.3)
    hits = sum(log.sampled() for _ in range(10_000))
    # mean 3000, standard deviation 45.8: six of them either side
    assert 2725 <= hits <= 3275


def test_sample_outside_zero_to_one_is_refused(tmp_path):
    for sample in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="sample"):
            RequestLogConfig(directory=tmp_path, sample=sample)


def test_timestamp_is_iso_utc_with_milliseconds():
    assert timestamp(1714564800.1234) == "2024-05-01T12:00:00.123Z"


def test_payloads_as_text_or_base64_and_only_when_enabled(tmp_path, make_log):
    with_bodies = make_log(tmp_path / "on", payload=True)
    without = make_log(tmp_path / "off")
    bodies = {"request": b'{"inputs": []}', "response": b"\xff\x00binary"}
    for log in (with_bodies, without):
        log.record(entry(1, **bodies))
        log.close()

    [on] = read_lines(tmp_path / "on" / FILENAME)
    assert on["request"] == '{"inputs": []}'
    assert on["response"] == {"base64": "/wBiaW5hcnk="}
    [off] = read_lines(tmp_path / "off" / FILENAME)
    assert "request" not in off
    assert "response" not in off
    assert off["request_id"] == "req-000001"


def rotated_files(directory: Path, backups: int) -> list[Path]:
    """Oldest first: .backups ... .1, then the current file."""
    names = [f"{FILENAME}.{i}" for i in range(backups, 0, -1)] + [FILENAME]
    return [directory / name for name in names if (directory / name).exists()]


def test_rotation_keeps_whole_lines_and_every_line_within_the_backups(tmp_path, make_log):
    log = make_log(tmp_path, max_bytes=2000, backups=3)
    for i in range(30):
        log.record(entry(i))
    log.close()

    files = rotated_files(tmp_path, 3)
    assert len(files) == 3  # about 160-byte lines: 12 + 12 + 6
    ids = []
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 2000
        assert data.endswith(b"\n")
        ids += [line["request_id"] for line in read_lines(path)]
    assert ids == [f"req-{i:06d}" for i in range(30)]


def test_rotation_drops_the_oldest_files_beyond_the_backups(tmp_path, make_log):
    log = make_log(tmp_path, max_bytes=1000, backups=2)
    total = 200
    for i in range(total):
        log.record(entry(i))
    log.close()

    assert not (tmp_path / f"{FILENAME}.3").exists()
    files = rotated_files(tmp_path, 2)
    assert len(files) == 3
    per_file = [len(read_lines(path)) for path in files]
    assert per_file[0] == per_file[1] > 0  # full backups, the current file filling up
    ids = [line["request_id"] for path in files for line in read_lines(path)]
    # the newest lines, in order, none missing
    assert ids == [f"req-{i:06d}" for i in range(total - len(ids), total)]
    assert log.written == total


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path, make_log):
    # The log file is a FIFO nobody reads yet: the writer blocks opening it, as it
    # would on a hung disk, so nothing leaves the queue.
    os.mkfifo(tmp_path / FILENAME)
    log = make_log(tmp_path, queue=10)
    try:
        slowest = 0.0
        for i in range(15):
            start = time.perf_counter()
            log.record(entry(i))
            slowest = max(slowest, time.perf_counter() - start)
        assert log.dropped_full == 5
        assert slowest < 0.05
        assert log.written == 0
    finally:
        # Reading unblocks the writer: the ten queued entries come through.
        with open(tmp_path / FILENAME, "rb") as fifo:
            log.close()
            data = fifo.read()
    assert [json.loads(line)["request_id"] for line in data.splitlines()] == [
        f"req-{i:06d}" for i in range(10)
    ]
    assert (log.written, log.dropped_full, log.dropped_error) == (10, 5, 0)


def test_a_full_disk_counts_drops_then_writing_resumes(tmp_path, make_log, caplog):
    caplog.set_level(logging.WARNING, logger="tidegate.requestlog")
    (tmp_path / FILENAME).symlink_to("/dev/full")  # every write fails with ENOSPC
    log = make_log(tmp_path)
    for batch in range(3):
        for i in range(5):
            log.record(entry(batch * 5 + i))
        wait_for(lambda n=batch: log.dropped_error == 5 * (n + 1))
    assert log.written == 0
    warnings = [r for r in caplog.records if r.name == "tidegate.requestlog"]
    assert len(warnings) == 1  # at most one line a minute
    assert "No space left" in warnings[0].getMessage()

    (tmp_path / FILENAME).unlink()  # space again: the next batch opens a real file
    for i in range(15, 18):
        log.record(entry(i))
    wait_for(lambda: log.written == 3)
    assert [line["request_id"] for line in read_lines(tmp_path / FILENAME)] == [
        "req-000015",
        "req-000016",
        "req-000017",
    ]
    assert log.dropped_error == 15


def test_an_unwritable_directory_counts_drops_and_never_raises(tmp_path, make_log):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    log = make_log(blocker / "logs")  # mkdir fails even as root
    for i in range(7):
        log.record(entry(i))
    wait_for(lambda: log.dropped_error == 7)
    assert log.written == 0

    blocker.unlink()  # the path can be created now: writing resumes
    last = entry(7)
    log.record(last)
    wait_for(lambda: log.written == 1)
    assert read_lines(blocker / "logs" / FILENAME) == [last]


def test_a_removed_directory_is_created_again(tmp_path, make_log):
    directory = tmp_path / "logs"
    log = make_log(directory)
    log.record(entry(0))
    wait_for(lambda: log.written == 1)
    (directory / FILENAME).unlink()
    directory.rmdir()

    log.record(entry(1))
    wait_for(lambda: log.written == 2)
    assert [line["request_id"] for line in read_lines(directory / FILENAME)] == ["req-000001"]


def test_record_after_close_is_counted_not_raised(tmp_path, make_log):
    log = make_log(tmp_path)
    log.close()
    log.record(entry(0))
    assert (log.written, log.dropped_full) == (0, 1)


def test_no_backups_keeps_only_the_current_file(tmp_path, make_log):
    log = make_log(tmp_path, max_bytes=1000, backups=0)
    for i in range(20):
        log.record(entry(i))
    log.close()

    assert sorted(path.name for path in tmp_path.iterdir()) == [FILENAME]
    ids = [line["request_id"] for line in read_lines(tmp_path / FILENAME)]
    assert 0 < len(ids) < 20
    assert ids == [f"req-{i:06d}" for i in range(20 - len(ids), 20)]
