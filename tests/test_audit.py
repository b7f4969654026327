"""The audit log under concurrent writers: several processes (the workers of one
server) and threads append to one file; every entry is one whole line."""

import json
import multiprocessing
from pathlib import Path

from tidegate.audit import AuditLog

WRITERS, ENTRIES = 4, 150
LONG = "x" * 20_000  # far past one pipe buffer or page: a torn write would show


def _append(path: Path, writer: int) -> None:
    log = AuditLog(path)
    for index in range(ENTRIES):
        log.append("test", "write", f"w{writer}", "done", LONG, index=index)
    log.close()


def test_processes_appending_at_once_leave_whole_lines(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append, args=(path, w)) for w in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    entries = [json.loads(line) for line in lines[:-1]]
    assert len(entries) == WRITERS * ENTRIES
    for writer in range(WRITERS):
        mine = [e["index"] for e in entries if e["model"] == f"w{writer}"]
        assert mine == list(range(ENTRIES))  # each writer's entries whole and in order
    assert all(e["reason"] == LONG for e in entries)
    reader = AuditLog(path)
    read = reader.read()
    reader.close()
    assert (len(read.entries), read.unreadable) == (WRITERS * ENTRIES, 0)


def test_a_partial_last_line_is_closed_before_the_next_entry(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"actor": "crashed mid-wri')
    log = AuditLog(path)
    log.append("test", "after", None, "done")
    read = log.read()
    log.close()
    assert read.unreadable == 1
    assert [e["action"] for e in read.entries] == ["after"]
