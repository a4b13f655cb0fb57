"""The device outbox on real SQLite: seqs never reused, acks, the bound, threads, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_runtime.fleet.outbox import OUTBOX_DROPPED, Outbox, OutboxCorruptError


def _open(tmp_path: Path, **kw: object) -> Outbox:
    return Outbox(tmp_path / "dev-1.sqlite", "dev-1", **kw)  # type: ignore[arg-type]


def test_seq_monotone_across_reopen_and_never_reused(tmp_path: Path) -> None:
    with _open(tmp_path) as box:
        seqs = [box.put("alerts", "drift", {"i": i}).seq for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        for s in seqs:  # every row acknowledged: MAX(seq) would forget them, the counter not
            box.ack(s)
        assert len(box) == 0
    with _open(tmp_path) as box:
        env = box.put("alerts", "drift", {})
        assert env.seq == 6
        assert box.last_seq() == 6
        # The stored payload is the whole envelope.
        ((seq, channel, payload),) = box.pending(10)
        obj = json.loads(payload)
        assert (seq, channel, obj["seq"], obj["device_id"]) == (6, "alerts", 6, "dev-1")


def test_pending_order_after_and_ack(tmp_path: Path) -> None:
    with _open(tmp_path) as box:
        for i in range(10):
            box.put("alerts", "e", {"i": i})
        assert [r[0] for r in box.pending(3)] == [1, 2, 3]
        assert [r[0] for r in box.pending(3, after=3)] == [4, 5, 6]
        box.ack(2)
        box.ack_many([4, 5])
        box.ack(99)  # unknown: ignored
        assert [r[0] for r in box.pending(100)] == [1, 3, 6, 7, 8, 9, 10]
        assert len(box) == 7


def test_birth_seq_and_meta_persist(tmp_path: Path) -> None:
    with _open(tmp_path) as box:
        assert box.next_birth_seq() == 1
        assert box.next_birth_seq() == 2
        box.put("alerts", "drift", {}, meta={"lifecycle": "dev-1:7"})
    with _open(tmp_path) as box:
        assert box.next_birth_seq() == 3
        assert box.get_meta("lifecycle") == "dev-1:7"
        box.put("alerts", "adaptation_finished", {}, meta={"lifecycle": None})
        assert box.get_meta("lifecycle") is None


def test_callable_body_sees_its_seq(tmp_path: Path) -> None:
    with _open(tmp_path) as box:
        box.put("alerts", "x", {})
        env = box.put("alerts", "y", lambda seq: {"lifecycle": f"dev-1:y:{seq}"})
        assert env.body == {"lifecycle": "dev-1:y:2"}


def test_bound_drops_oldest_and_reports_it(tmp_path: Path) -> None:
    with _open(tmp_path, max_messages=10) as box:
        for i in range(25):
            box.put("alerts", "e", {"i": i})
            assert len(box) <= 10
        rows = box.pending(100)
        seqs = [r[0] for r in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        bodies = [json.loads(p) for _, _, p in rows]
        # Newest history wins: the last message put is there.
        assert bodies[-1]["body"] == {"i": 24}
        drops = [b for b in bodies if b["type"] == OUTBOX_DROPPED]
        assert drops, "the loss itself must be reported"
        d = drops[-1]["body"]
        assert d["count"] >= 1 and d["first_seq"] <= d["last_seq"] < drops[-1]["seq"]
        # The dropped range is older than every row kept after it.
        assert all(r > d["last_seq"] for r in seqs if r >= drops[-1]["seq"])
        kept_data = {b["body"]["i"] for b in bodies if b["type"] == "e"}
        assert {20, 21, 22, 23, 24} <= kept_data


def test_thread_safety_smoke(tmp_path: Path) -> None:
    with _open(tmp_path) as box:
        got: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()

        def producer() -> None:
            for i in range(150):
                s = box.put("alerts", "e", {"i": i}).seq
                with lock:
                    got.append(s)

        def acker() -> None:
            while not stop.is_set():
                for seq, _, _ in box.pending(20):
                    box.ack(seq)

        threads = [threading.Thread(target=producer) for _ in range(4)]
        ack = threading.Thread(target=acker)
        ack.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        ack.join()
        assert len(got) == 600 and len(set(got)) == 600
        assert sorted(got) == list(range(1, 601))
        assert box.last_seq() == 600


_CHILD = """
import sys
from edge_runtime.fleet.outbox import Outbox
box = Outbox(sys.argv[1], "dev-1")
i = 0
while True:
    env = box.put("alerts", "e", {"i": i, "pad": "x" * 200})
    # Printed only after put returned: this seq is acknowledged as durable.
    print(env.seq, flush=True)
    i += 1
"""


def test_survives_sigkill_mid_puts(tmp_path: Path) -> None:
    path = tmp_path / "dev-1.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 200:
            line = proc.stdout.readline()
            assert line, "child died early"
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path, "dev-1") as box:
        seqs = [r[0] for r in box.pending(100_000)]
        assert len(seqs) == len(set(seqs))
        assert set(acked) <= set(seqs), "an acknowledged put was lost"
        assert seqs == list(range(1, len(seqs) + 1))
        for _, _, payload in box.pending(100_000):
            json.loads(payload)  # every row intact
        assert box.put("alerts", "e", {}).seq > max(seqs)


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "dev-1.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxCorruptError, match=str(path)):
        Outbox(path, "dev-1", on_corrupt="raise")
    with Outbox(path, "dev-1", clock=lambda: 1_700_000_000.0) as box:
        assert box.recovered_from is not None and box.recovered_from.exists()
        assert box.recovered_from.read_bytes().startswith(b"this is not")
        # Seqs restart above anything the lost file could have used, so de-dup keeps them.
        assert box.put("alerts", "e", {}).seq >= 1_700_000_000_000_000
        assert len(box) == 1
