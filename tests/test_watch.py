"""`btp watch` as the line runs it: a subprocess on a temp hot folder, files dropped while it runs
(good, broken, half-written then renamed, grown in steps, re-delivered), a real MQTT broker
(Debian's mosquitto on a free loopback port); kill -9 and a restart. Plus the ledger's export and
`btp-run --ledger`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.io import write_point_cloud
from runtime_helpers import real_scan, tiny_export

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
BROKEN_PLY = b"ply\nformat ascii 1.0\nelement vertex 3\n"  # the header is cut off


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mosquitto(tmp_path: Path, port: int, persistent: bool = False) -> subprocess.Popen:
    """mosquitto on 127.0.0.1:port; ``persistent``: sessions and queued messages survive a restart."""
    conf = tmp_path / f"mosquitto-{port}.conf"
    keep = f"persistence true\npersistence_location {tmp_path}/\n" if persistent else "persistence false\n"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{keep}")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"mosquitto did not start: {proc.stderr.read().decode()[-1000:]}")
            time.sleep(0.05)


def _need_mosquitto() -> None:
    if MOSQUITTO is None:
        pytest.skip("Debian's mosquitto is not installed (apt-get install mosquitto; .ci/run and `make setup` do)")
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed (pip install 'btp-edge[line]')")


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto on 127.0.0.1:<free port> -> the port."""
    _need_mosquitto()
    port = _free_port()
    proc = _start_mosquitto(tmp_path, port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


class Subscriber:
    """Collects the messages of one topic (QoS 1) from the test's broker."""

    def __init__(self, port: int, topic: str, client_id: str = "") -> None:
        """``client_id``: a persistent session (the broker keeps its messages while it is away)."""
        import paho.mqtt.client as mqtt

        self.messages: list[dict] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not client_id)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the test's subscriber could not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Service:
    """`btp watch` in a subprocess; its stdout lines collected on a thread."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        env = dict(os.environ)  # the btp this test imports: the checkout, an editable install or a wheel
        self.stderr_path = tmp_path / f"watch-stderr-{time.monotonic_ns()}.txt"
        self.proc = subprocess.Popen([sys.executable, "-m", "btp.cli", "watch", *args], stdout=subprocess.PIPE,
                                     stderr=self.stderr_path.open("wb"), text=True, env=env)
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return rc


def _ledger_rows(db: Path) -> list[dict]:
    if not db.is_file():
        return []
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM scans ORDER BY id")]
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        con.close()


def _wait_for(predicate, timeout: float, what: str, service: Service) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if service.proc.poll() is not None:
            pytest.fail(f"btp watch exited ({service.proc.returncode}) while waiting for {what}: {service.stderr[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; stderr: {service.stderr[-3000:]}")
        time.sleep(0.1)


def _scan_bytes(tmp_path: Path, shapes_root: Path, seed: int, name="x.pcd") -> bytes:
    path = tmp_path / f"src-{seed}-{name}"
    points = real_scan(shapes_root, n=3000, seed=seed)
    if path.suffix == ".xyz":
        np.savetxt(path, points, fmt="%.6f")
    else:
        write_point_cloud(path, points)
    return path.read_bytes()


def test_watch_scores_each_complete_file_once_with_mqtt(tmp_path, shapes_root, tmp_path_factory, broker):
    model = tiny_export(tmp_path_factory)[0]
    hot, out, done, failed = tmp_path / "in", tmp_path / "out", tmp_path / "done", tmp_path / "failed"
    hot.mkdir()
    (hot / "bracket_0001.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 1))  # there before the start
    sub = Subscriber(broker, "line1/btp")
    service = Service([str(hot), "--model", str(model), "--out", str(out), "--settle", "1.0", "--poll", "0.1",
                       "--threshold", "0.5", "--heatmap", "none", "--mqtt", f"127.0.0.1:{broker}",
                       "--topic", "line1/btp", "--move-done", str(done), "--move-failed", str(failed)], tmp_path)
    db = out / "ledger.sqlite"
    try:
        _wait_for(lambda: len(service.lines) >= 1, 60, "the scan present at the start", service)
        (hot / "bracket_0002.ply").write_bytes(BROKEN_PLY)
        (hot / "line2").mkdir()
        (hot / "line2" / "bracket_0003.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 3))  # a subfolder
        # written as *.part in steps, then renamed: never taken while partial
        payload = _scan_bytes(tmp_path, shapes_root, 4)
        part = hot / "bracket_0004.pcd.part"
        with part.open("wb") as fh:
            for i in range(4):
                fh.write(payload[i * len(payload) // 4:(i + 1) * len(payload) // 4])
                fh.flush()
                time.sleep(0.3)
        part.rename(hot / "bracket_0004.pcd")
        # grown in steps under its final name, each pause shorter than the settle time
        payload = _scan_bytes(tmp_path, shapes_root, 5, "x.xyz")
        grown = hot / "bracket_0005.xyz"
        with grown.open("wb") as fh:
            for i in range(5):
                fh.write(payload[i * len(payload) // 5:(i + 1) * len(payload) // 5])
                fh.flush()
                time.sleep(0.4)
        _wait_for(lambda: len(_ledger_rows(db)) >= 5, 60, "five scans in the ledger", service)
        # the same bytes delivered again to the same path: not scored again (and moved to done as well)
        _wait_for(lambda: (done / "bracket_0001.pcd").is_file(), 20, "the first scan moved to --move-done", service)
        (hot / "bracket_0001.pcd").write_bytes((done / "bracket_0001.pcd").read_bytes())
        _wait_for(lambda: not (hot / "bracket_0001.pcd").exists(), 20, "the re-delivered file moved", service)
        _wait_for(lambda: len(sub.messages) >= 5, 20, "five MQTT messages", service)
        assert "the same bytes as an earlier scan" in service.stderr
    finally:
        rc = service.stop()
        sub.close()
    assert rc == 0, service.stderr[-3000:]
    rows = _ledger_rows(db)
    names = sorted(Path(r["path"]).name for r in rows)
    assert names == ["bracket_0001.pcd", "bracket_0002.ply", "bracket_0003.pcd", "bracket_0004.pcd",
                     "bracket_0005.xyz"], rows
    by_name = {Path(r["path"]).name: r for r in rows}
    bad = by_name["bracket_0002.ply"]
    assert bad["status"] == "failed" and "end_header" in bad["error"]
    assert (failed / "bracket_0002.ply").is_file() and not (hot / "bracket_0002.ply").exists()
    moved = sorted(str(p.relative_to(done)) for p in done.rglob("*") if p.is_file())
    copy = [m for m in moved if m.startswith("bracket_0001.2") and m.endswith(".pcd")]  # the re-delivery, timestamped
    assert len(copy) == 1 and sorted(set(moved) - set(copy)) == ["bracket_0001.pcd", "bracket_0004.pcd",
                                                                 "bracket_0005.xyz", "line2/bracket_0003.pcd"]
    assert not [p for p in hot.rglob("*") if p.is_file()]  # the hot folder is empty: every file was handled
    for name, r in by_name.items():
        if name != "bracket_0002.ply":
            assert r["status"] == "ok" and 0 <= r["object_score"] <= 1 and r["decision"] in ("normal", "anomalous")
            assert (out / f"{r['stem']}.json").is_file()
    assert by_name["bracket_0003.pcd"]["stem"] == "line2__bracket_0003"
    grown_ok = by_name["bracket_0005.xyz"]
    assert grown_ok["points"] == 3000  # taken only once complete
    assert all(r["published"] == 3 for r in rows)  # sent to both channels: stdout and MQTT
    # one JSON line on stdout and one MQTT message per file, the same message
    for channel in (service.lines, sub.messages):
        assert sorted(Path(m["file"]).name for m in channel) == names
    assert sorted(service.lines, key=lambda m: m["ledger_id"]) == sorted(sub.messages, key=lambda m: m["ledger_id"])
    msg = {Path(m["file"]).name: m for m in service.lines}
    assert msg["bracket_0002.ply"]["verdict"] == "FAILED" and "end_header" in msg["bracket_0002.ply"]["error"]
    assert msg["bracket_0004.pcd"]["part"] == "bracket" and msg["bracket_0004.pcd"]["serial"] == "0004"
    assert msg["bracket_0004.pcd"]["verdict"] == ("OK" if msg["bracket_0004.pcd"]["decision"] == "normal" else "NG")
    for m in service.lines:  # the message's regions: the largest of the ledger's, with the total
        row = next(r for r in rows if r["id"] == m["ledger_id"])
        assert m["regions"] == json.loads(row["regions"] or "[]")[:20]
        assert m["regions_total"] == len(json.loads(row["regions"] or "[]"))


def test_kill_9_then_restart_scores_no_file_twice_and_loses_none(tmp_path, shapes_root, tmp_path_factory):
    model = tiny_export(tmp_path_factory)[0]
    hot, out = tmp_path / "in", tmp_path / "out"
    hot.mkdir()
    names = [f"part_{i:04d}.pcd" for i in range(10)]
    for i, name in enumerate(names):
        (hot / name).write_bytes(_scan_bytes(tmp_path, shapes_root, 10 + i))
    args = [str(hot), "--model", str(model), "--out", str(out), "--settle", "0.2", "--poll", "0.1", "--batch", "1",
            "--heatmap", "png"]  # png: a slower scan, so the kill lands mid-way
    db = out / "ledger.sqlite"
    first = Service(args, tmp_path)
    _wait_for(lambda: len(_ledger_rows(db)) >= 2, 60, "two scans before the kill", first)
    first.stop(signal.SIGKILL)
    before = len(_ledger_rows(db))
    assert before < len(names), "the kill came too late to test a restart"
    second = Service(args, tmp_path)
    _wait_for(lambda: len(_ledger_rows(db)) >= len(names), 90, "every scan after the restart", second)
    time.sleep(1.0)  # a few more polls: nothing else may be scored
    assert second.stop() == 0, second.stderr[-3000:]
    rows = _ledger_rows(db)
    assert sorted(Path(r["path"]).name for r in rows) == names  # each file once: none twice, none lost
    assert all(r["status"] == "ok" and r["published"] == 1 for r in rows)  # sent to stdout
    sent = [Path(m["file"]).name for m in first.lines + second.lines]
    assert set(sent) == set(names)  # every result reached stdout (a row the kill left unsent: at the restart)
    restarted = {Path(m["file"]).name for m in second.lines}
    assert len(restarted) >= len(names) - before


def test_sigterm_finishes_the_batch_in_flight(tmp_path, shapes_root, tmp_path_factory):
    model = tiny_export(tmp_path_factory)[0]
    hot, out = tmp_path / "in", tmp_path / "out"
    hot.mkdir()
    for i in range(6):
        (hot / f"part_{i:04d}.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 30 + i))
    service = Service([str(hot), "--model", str(model), "--out", str(out), "--settle", "0.2", "--poll", "0.1",
                       "--batch", "3", "--heatmap", "png"], tmp_path)
    db = out / "ledger.sqlite"
    _wait_for(lambda: "scan(s) in" in service.stderr or len(_ledger_rows(db)) >= 1, 60, "the first batch", service)
    assert service.stop() == 0
    rows = _ledger_rows(db)
    assert len(rows) in (3, 6) and all(r["published"] == 1 for r in rows)  # whole batches only
    assert len(service.lines) == len(rows)
    assert "SIGTERM" in service.stderr


def test_ledger_export_and_btp_run_ledger(tmp_path, shapes_root, tmp_path_factory):
    model = tiny_export(tmp_path_factory)[0]
    scans = tmp_path / "scans"
    scans.mkdir()
    write_point_cloud(scans / "housing_A17.pcd", real_scan(shapes_root, n=3000, seed=40))
    (scans / "housing_A18.ply").write_bytes(BROKEN_PLY)
    db = tmp_path / "ledger.sqlite"
    runner = CliRunner()
    for _ in range(2):  # a re-run of the same files replaces their rows
        res = runner.invoke(app, ["run", str(model), str(scans), "--out", str(tmp_path / "out"), "--ledger", str(db),
                                  "--heatmap", "none", "--threshold", "0.5"])
        assert res.exit_code == 1, res.output  # one file failed
    rows = _ledger_rows(db)
    assert sorted((Path(r["path"]).name, r["status"]) for r in rows) == [("housing_A17.pcd", "ok"),
                                                                          ("housing_A18.ply", "failed")]
    good = next(r for r in rows if r["status"] == "ok")
    doc = json.loads((tmp_path / "out" / "housing_A17.json").read_text())
    assert good["object_score"] == pytest.approx(doc["object_score"]) and good["part"] == "housing"
    assert good["serial"] == "A17" and json.loads(good["regions"]) == doc["regions"]
    res = runner.invoke(app, ["ledger", "export", str(db), "--format", "json"])
    assert res.exit_code == 0, res.output
    exported = json.loads(res.output)
    assert [r["path"] for r in exported] == [r["path"] for r in rows]
    res = runner.invoke(app, ["ledger", "export", str(db), "--format", "csv", "--since", "2999-01-01"])
    assert res.exit_code == 0 and res.output.splitlines()[0].startswith("id,station,path,") and len(res.output.splitlines()) == 1
    res = runner.invoke(app, ["ledger", "export", str(db), "--format", "csv", "--since", "2000-01-01"])
    assert len(res.output.strip().splitlines()) == 3
    res = runner.invoke(app, ["ledger", "export", str(tmp_path / "nope.sqlite")])
    assert res.exit_code == 2 and "no ledger at" in res.output


def test_part_and_serial_from_the_name():
    from btp.runtime.ledger import LedgerError, check_name_pattern, part_and_serial

    assert part_and_serial("/x/bracket-left_SN00042.pcd") == ("bracket-left", "SN00042")
    assert part_and_serial("scan.ply") == (None, "scan")
    pattern = check_name_pattern(r"^(?P<serial>\d+)-(?P<part>\w+)$")
    assert part_and_serial("0042-housing.npz", pattern) == ("housing", "0042")
    with pytest.raises(LedgerError, match="serial"):
        check_name_pattern(r"(?P<part>.+)")


def test_a_broker_outage_delays_the_messages_and_loses_none(tmp_path, shapes_root, tmp_path_factory):
    _need_mosquitto()
    model = tiny_export(tmp_path_factory)[0]
    hot, out = tmp_path / "in", tmp_path / "out"
    hot.mkdir()
    port = _free_port()
    broker = _start_mosquitto(tmp_path, port, persistent=True)
    sub = Subscriber(port, "line1/btp", client_id="line-plc")  # its session outlives the broker's restart
    service = Service([str(hot), "--model", str(model), "--out", str(out), "--settle", "0.3", "--poll", "0.1",
                       "--heatmap", "none", "--mqtt", f"127.0.0.1:{port}", "--topic", "line1/btp"], tmp_path)
    db = out / "ledger.sqlite"
    try:
        _wait_for(lambda: "connected" in service.stderr, 60, "the service's MQTT connection", service)
        broker.terminate()  # the outage
        broker.wait(timeout=10)
        for i in range(2):
            (hot / f"cap_{i:04d}.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 50 + i))
        _wait_for(lambda: [r["published"] for r in _ledger_rows(db)] == [1, 1], 60,
                  "both scans sent to stdout (not to MQTT: the broker is down)", service)
        assert len(service.lines) == 2
        broker = _start_mosquitto(tmp_path, port, persistent=True)
        _wait_for(lambda: len(sub.messages) >= 2, 60, "the delayed MQTT messages", service)
        time.sleep(0.5)
    finally:
        rc = service.stop()
        sub.close()
        broker.terminate()
        broker.wait(timeout=10)
    assert rc == 0, service.stderr[-3000:]
    assert sorted(m["serial"] for m in sub.messages) == ["0000", "0001"]  # each once, none lost
    assert sorted(m["serial"] for m in service.lines) == ["0000", "0001"]  # stdout not repeated
    assert all(r["published"] == 3 for r in _ledger_rows(db))


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server (Debian's postgresql) on 127.0.0.1:<free port>, trust auth, user
    btp -> its URL. As root the server runs as the system user postgres (it refuses root)."""
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("Debian's postgresql is not installed (apt-get install postgresql; .ci/run and `make setup` do)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'btp-edge[line]')")
    import psycopg

    as_user = None
    if os.geteuid() == 0:
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres system user to run the server as")
        as_user = (entry.pw_uid, entry.pw_gid)
    top = Path(tempfile.mkdtemp(prefix="btp-pg-"))
    if as_user:
        os.chown(top, *as_user)

    def drop():
        if as_user:
            os.setgid(as_user[1])
            os.setuid(as_user[0])

    subprocess.run([str(bindir / "initdb"), "-D", str(top / "data"), "-A", "trust", "-U", "btp", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, preexec_fn=drop)
    port = _free_port()
    server = subprocess.Popen([str(bindir / "postgres"), "-D", str(top / "data"), "-k", str(top), "-p", str(port),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=drop)
    url = f"postgresql://btp@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"postgres did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(top, ignore_errors=True)


def test_postgres_ledger_keeps_stations_apart_under_concurrent_writers(postgres_url):
    from btp.runtime.ledger import Ledger, ScanRecord

    def write(station: str, n: int) -> None:
        with Ledger(postgres_url, station=station) as book:
            for i in range(n):
                assert book.record(ScanRecord(path=f"/scans/part_{i:04d}.pcd", status="ok", size=10 + i, mtime_ns=i,
                                              sha256=f"{i:064x}", object_score=0.5, regions=[{"points": i}])) is not None
                assert book.record(ScanRecord(path=f"/scans/part_{i:04d}.pcd", status="ok", size=10 + i, mtime_ns=i,
                                              sha256=f"{i:064x}")) is None  # the same version again: ignored

    threads = [threading.Thread(target=write, args=(station, 40)) for station in ("line1", "line2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with Ledger(postgres_url, station="line1") as book:
        rows = book.rows()
        assert len(rows) == 80 and len({r["id"] for r in rows}) == 80
        assert sorted({r["station"] for r in rows}) == ["line1", "line2"]
        assert book.seen("/scans/part_0003.pcd", 13, 3) and not book.seen("/scans/part_0003.pcd", 13, 4)
        assert [r["regions"] for r in book.rows_for("/scans/part_0003.pcd")] == [[{"points": 3}]]  # its own only
    with Ledger(postgres_url, station="line3") as book:
        assert not book.seen("/scans/part_0003.pcd", 13, 3)  # another station's file
    res = CliRunner().invoke(app, ["ledger", "export", postgres_url, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)) == 80


def test_two_stations_watch_into_one_postgres_ledger_with_a_kill_9(tmp_path, shapes_root, tmp_path_factory,
                                                                   postgres_url):
    model = tiny_export(tmp_path_factory)[0]
    services, folders = [], {}
    for station in ("line1", "line2"):
        hot = tmp_path / station / "in"
        hot.mkdir(parents=True)
        for i in range(4):
            (hot / f"part_{i:04d}.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 60 + i))  # same names
        folders[station] = hot
    args = lambda station: [str(folders[station]), "--model", str(model), "--out", str(tmp_path / station / "out"),
                            "--settle", "0.2", "--poll", "0.1", "--batch", "1", "--heatmap", "png",
                            "--ledger", postgres_url, "--station", station]

    def count(station):
        import psycopg

        with psycopg.connect(postgres_url) as con:
            try:
                return con.execute("SELECT count(*) FROM scans WHERE station = %s", (station,)).fetchone()[0]
            except psycopg.errors.UndefinedTable:
                return 0

    first = Service(args("line1"), tmp_path)
    other = Service(args("line2"), tmp_path)
    _wait_for(lambda: count("line1") >= 1, 60, "a first scan of line1", first)
    first.stop(signal.SIGKILL)
    again = Service(args("line1"), tmp_path)
    _wait_for(lambda: count("line1") >= 4 and count("line2") >= 4, 90, "every scan of both stations", again)
    time.sleep(1.0)
    assert again.stop() == 0 and other.stop() == 0, again.stderr[-2000:] + other.stderr[-2000:]
    from btp.runtime.ledger import Ledger

    with Ledger(postgres_url) as book:
        rows = book.rows()
    for station in ("line1", "line2"):
        names = sorted(Path(r["path"]).name for r in rows if r["station"] == station)
        assert names == [f"part_{i:04d}.pcd" for i in range(4)], (station, names)  # each once, none lost
    assert all(r["status"] == "ok" and r["published"] == 1 for r in rows)
    # a station's report from the shared ledger: its own scans only
    res = CliRunner().invoke(app, ["report", str(tmp_path / "line2" / "out"), "--ledger", postgres_url,
                                   "--station", "line2"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "line2" / "out" / "report.html").read_text()
    listed = json.loads(page.split("const ROWS = ", 1)[1].split(";\n", 1)[0])
    assert sorted(r["file"] for r in listed) == sorted(r["path"] for r in rows if r["station"] == "line2")
    assert all(r["image"] for r in listed)  # each scan's heat map found beside the ledger's row


def test_a_file_the_service_died_on_goes_alone_then_is_given_up(tmp_path, shapes_root, tmp_path_factory, capsys):
    """Files in flight when the service died (the ledger's inflight marks): scored alone next time,
    so that a file that crashes the process cannot take others down; after MAX_ATTEMPTS deaths it is
    recorded as failed without being read again. In-process, on the Watcher itself."""
    from btp.runtime.ledger import Ledger, file_version
    from btp.runtime.pipeline import Pipeline
    from btp.runtime.watch import MAX_ATTEMPTS, STDOUT, Watcher, WatchOptions

    model = tiny_export(tmp_path_factory)[0]
    hot, out = tmp_path / "in", tmp_path / "out"
    hot.mkdir()
    for i in range(5):
        (hot / f"cover_{i:04d}.pcd").write_bytes(_scan_bytes(tmp_path, shapes_root, 70 + i))
    book = Ledger(out / "ledger.sqlite")
    suspect, poison = hot / "cover_0001.pcd", hot / "cover_0002.pcd"
    book.begin(suspect, file_version(suspect)[2])  # in flight once when the service died
    for _ in range(MAX_ATTEMPTS):
        book.begin(poison, file_version(poison)[2])  # the service died on it every time
    sent = []
    watcher = Watcher(pipeline=Pipeline(model), options=WatchOptions(in_dir=hot, out=out, settle_s=0.0, heatmaps=()),
                      ledger=book, sinks={STDOUT: sent.append})
    capsys.readouterr()
    watcher.poll_once()  # sees the files
    watcher.poll_once()  # takes them
    log = capsys.readouterr().err
    rows = {Path(r["path"]).name: r for r in book.rows()}
    assert sorted(rows) == [f"cover_{i:04d}.pcd" for i in range(5)]
    assert rows["cover_0002.pcd"]["status"] == "failed" and "ServiceCrash" in rows["cover_0002.pcd"]["error"]
    assert all(r["status"] == "ok" for name, r in rows.items() if name != "cover_0002.pcd")
    assert log.count("1 scan(s) in") == 1 and log.count("3 scan(s) in") == 1  # the suspect alone, then the rest
    assert all(book.attempts(hot / name, r["sha256"]) == 0 for name, r in rows.items())
    assert sorted(m["serial"] for m in sent) == ["0000", "0001", "0002", "0003", "0004"]
    book.close()


def test_watch_with_references_routes_each_scan_to_its_part(tmp_path, shapes_root, tmp_path_factory, broker):
    """`btp watch --reference DIR`: the references are loaded once, each scan is routed to its part
    by btp-run's rule, and the part's result (fused and reference scores, deviation, fitness, the
    part's threshold; not registered, no part) is in the ledger row, the stdout line and the MQTT
    message; `btp report` on the folder shows it."""
    from runtime_helpers import BUNNY, PINION, build_references, turned, with_bump

    model = tiny_export(tmp_path_factory)[0]
    refs = build_references(tmp_path / "references", model, shapes_root)
    hot, out = tmp_path / "in", tmp_path / "out"
    (hot / "bunny").mkdir(parents=True)
    good = real_scan(shapes_root, BUNNY, n=3000, seed=40)
    gear = real_scan(shapes_root, PINION, n=3000, seed=60)
    write_point_cloud(hot / "bunny" / "cell3_0001.pcd", turned(good, 41))  # routed by its folder
    write_point_cloud(hot / "bunny_0002.pcd", turned(with_bump(good), 42))  # by its file name; a bump
    write_point_cloud(hot / "bunny" / "cell3_0003.pcd", turned(gear, 60))  # a gear in the bunny's folder
    write_point_cloud(hot / "gear_0004.pcd", turned(gear, 61))  # no part of that name
    sub = Subscriber(broker, "line1/btp")
    service = Service([str(hot), "--model", str(model), "--reference", str(refs), "--out", str(out), "--once",
                       "--settle", "0.2", "--poll", "0.1", "--threshold", "0.5", "--heatmap", "png",
                       "--mqtt", f"127.0.0.1:{broker}", "--topic", "line1/btp"], tmp_path)
    try:
        assert service.proc.wait(timeout=180) == 0, service.stderr[-3000:]
        service._reader.join(timeout=10)
        _wait_for(lambda: len(sub.messages) >= 4, 20, "four MQTT messages", service)
    finally:
        sub.close()
    log = service.stderr
    assert "reference bunny: " in log and "reference block: " in log and "routing: a folder" in log
    assert "--threshold is not used" in log  # each part's own threshold decides
    rows = {Path(r["path"]).name: r for r in _ledger_rows(out / "ledger.sqlite")}
    assert sorted(rows) == ["bunny_0002.pcd", "cell3_0001.pcd", "cell3_0003.pcd", "gear_0004.pcd"]
    msgs = {Path(m["file"]).name: m for m in service.lines}
    assert sorted(m["ledger_id"] for m in sub.messages) == sorted(m["ledger_id"] for m in service.lines)
    assert rows["cell3_0001.pcd"]["stem"] == "bunny__cell3_0001"
    bunny_threshold = json.loads((out / "bunny__cell3_0001.json").read_text())["reference"]["threshold"]
    for name, verdict, decision in (("cell3_0001.pcd", "OK", "normal"), ("bunny_0002.pcd", "NG", "anomalous")):
        row, msg = rows[name], msgs[name]
        ref = json.loads(row["reference"])
        doc = json.loads((out / f"{row['stem']}.json").read_text())
        assert row["part"] == "bunny" and msg["part"] == "bunny" and ref["part"] == "bunny"
        assert row["decision"] == decision and msg["verdict"] == verdict, ref
        assert ref["registered"] and ref["fitness"] > 0.9 and ref["decision"] == decision
        assert row["threshold"] == pytest.approx(bunny_threshold) and row["threshold_source"].startswith("reference bunny")
        assert row["object_score"] == pytest.approx(ref["object_score"]) == pytest.approx(doc["object_score"])
        assert ref["zero_shot_score"] == pytest.approx(doc["zero_shot_score"])
        assert ref["deviation"] == pytest.approx(doc["reference"]["deviation"])
        assert msg["reference"] == ref and msg["threshold"] == pytest.approx(bunny_threshold)
        assert (out / f"{row['stem']}.fused.png").is_file() and (out / f"{row['stem']}.deviation.png").is_file()
    assert json.loads(rows["cell3_0001.pcd"]["reference"])["route"] == "folder bunny"
    assert json.loads(rows["bunny_0002.pcd"]["reference"])["route"] == "file name bunny*"
    size = float(np.linalg.norm(np.ptp(good, axis=0)))  # the bump stands out by up to 6 % of the size
    assert msgs["bunny_0002.pcd"]["reference"]["deviation"]["max_abs"] > 0.03 * size
    assert msgs["cell3_0001.pcd"]["reference"]["deviation"]["max_abs"] < 0.03 * size
    # the regions are the fused map's at the part's threshold: the largest one sits on the bump
    peak = turned(with_bump(good), 42)[0]  # the bump's top, in the scan's units
    largest = msgs["bunny_0002.pcd"]["regions"][0]
    assert np.linalg.norm(np.asarray(largest["center"]) - peak) < 0.08 * size, (largest, peak)
    assert largest["peak"] > bunny_threshold and json.loads(rows["bunny_0002.pcd"]["regions"])[0] == largest
    lost = msgs["cell3_0003.pcd"]  # routed to the bunny by its folder, but it is a gear: flagged, not decided
    assert lost["verdict"] == "NONE" and lost["decision"] == "not registered" and lost["threshold"] is None
    assert lost["reference"]["part"] == "bunny" and not lost["reference"]["registered"]
    assert lost["reference"]["fitness"] < 0.6
    alone = msgs["gear_0004.pcd"]
    assert alone["verdict"] == "NONE" and alone["decision"] == "no reference" and alone["part"] == "gear"
    assert alone["reference"]["part"] is None and "no part matched" in alone["reference"]["route"]
    assert not (out / "gear_0004.fused.png").exists()
    # the shift's report from the ledger: the part, its threshold and source, the fused and deviation views
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    listed = {Path(r["file"]).name: r for r in json.loads(page.split("const ROWS = ", 1)[1].split(";\n", 1)[0])}
    bump = listed["bunny_0002.pcd"]
    assert bump["verdict"] == "NG" and bump["part"] == "bunny" and bump["threshold_source"].startswith("reference bunny")
    assert bump["reference"]["fused_image"] == "bunny_0002.fused.png" and bump["thumb"] == "bunny_0002.fused.png"
    assert bump["reference"]["deviation_image"] == "bunny_0002.deviation.png" and bump["image"] == "bunny_0002.png"
    assert not listed["cell3_0003.pcd"]["hist"] and not listed["gear_0004.pcd"]["hist"]  # not on a part's scale
    info = json.loads(page.split("const INFO = ", 1)[1].split(";\n", 1)[0])
    assert [t["value"] for t in info["thresholds"]] == pytest.approx([bunny_threshold])
