"""`btp-bench serve`: a load test of btp on NVIDIA Triton (the Python-backend repository of
`btp export --format triton`), against the same scans through the in-process runtime.

For each protocol (HTTP, gRPC via tritonclient) and concurrency (1, 4, 16 client threads, each with
its own client) the clients send scans for ``duration_s`` seconds; every request carries an id and
every 8th one is a bad scan (3 points) that must come back as an error. Reported: good requests/s,
p50/p90/p99 latency, unexpected errors, and whether every id got exactly one answer. Then a client
process is killed (SIGKILL) in the middle of a burst and the server must still answer.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from btp.benchmarks.stats import summarize

BAD_EVERY = 8


def _client(protocol: str, port: int):
    if protocol == "http":
        import tritonclient.http as client_lib
    else:
        import tritonclient.grpc as client_lib
    return client_lib, client_lib.InferenceServerClient(f"127.0.0.1:{port}")


def _request(lib, client, scan: np.ndarray, request_id: str):
    inp = lib.InferInput("points", list(scan.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(scan, np.float32))
    return client.infer("btp", [inp], request_id=request_id)


def load_run(protocol: str, port: int, scans: list[np.ndarray], concurrency: int, duration_s: float) -> dict:
    """``concurrency`` threads for ``duration_s``; -> throughput, latencies, answers per id."""
    bad_scan = np.zeros((3, 3), np.float32)
    latencies: list[float] = []
    answers: dict[str, int] = {}
    errors: list[str] = []
    expected_errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker(w: int) -> None:
        lib, client = _client(protocol, port)
        k = 0
        while time.perf_counter() < stop_at:
            rid = f"{protocol}-{concurrency}-{w}-{k}"
            bad = k % BAD_EVERY == BAD_EVERY - 1
            scan = bad_scan if bad else scans[(w + k) % len(scans)]
            t0 = time.perf_counter()
            try:
                result = _request(lib, client, scan, rid)
                ok = result.as_numpy("point_scores").shape == (len(scan),)
                with lock:
                    answers[rid] = answers.get(rid, 0) + 1
                    if bad:
                        errors.append(f"{rid}: a 3-point scan was answered")
                    elif ok:
                        latencies.append((time.perf_counter() - t0) * 1e3)
                    else:
                        errors.append(f"{rid}: wrong point_scores shape")
            except Exception as exc:  # tritonclient raises InferenceServerException for 4xx/INVALID_ARGUMENT
                with lock:
                    answers[rid] = answers.get(rid, 0) + 1
                    if bad and "fewer than the model" in str(exc):
                        expected_errors[0] += 1
                    else:
                        errors.append(f"{rid}: {exc}")
            k += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = summarize(latencies) if latencies else None
    return {"protocol": protocol, "concurrency": concurrency, "seconds": round(wall, 2),
            "good_requests": len(latencies), "scans_per_s": len(latencies) / wall,
            "p50_ms": st.p50 if st else None, "p90_ms": st.p90 if st else None, "p99_ms": st.p99 if st else None,
            "bad_requests_rejected": expected_errors[0], "unexpected_errors": len(errors),
            "error_examples": errors[:3], "ids": len(answers), "every_id_answered_once": all(v == 1 for v in answers.values())}


_KILLED_CLIENT = """
import sys, numpy as np, tritonclient.http as h
c = h.InferenceServerClient("127.0.0.1:%d", concurrency=8)
pts = np.load(sys.argv[1])
reqs = []
for k in range(200):
    i = h.InferInput("points", list(pts.shape), "FP32"); i.set_data_from_numpy(pts)
    reqs.append(c.async_infer("btp", [i]))
print("sent", flush=True)
for r in reqs:
    r.get_result()
"""


def killed_client_check(port: int, scan: np.ndarray, tmp: Path) -> dict:
    """A client with 200 requests in flight is SIGKILLed; the server must answer the next request."""
    np.save(tmp / "scan.npy", scan)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT % port, str(tmp / "scan.npy")],
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # "sent": the burst is in flight
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lib, client = _client("http", port)
    t0 = time.perf_counter()
    deadline = t0 + 120
    while True:  # the server first finishes the abandoned requests
        try:
            ok = _request(lib, client, scan, "after-kill").as_numpy("point_scores").shape == (len(scan),)
            break
        except Exception:
            if time.perf_counter() > deadline:
                ok = False
                break
            time.sleep(0.5)
    return {"answered_after_kill": bool(ok), "seconds_to_answer": round(time.perf_counter() - t0, 2)}


def run_serve_bench(model_onnx, *, concurrency=(1, 4, 16), protocols=("http", "grpc"), duration_s: float = 10.0,
                    points: int = 8192, n_scans: int = 8, progress=print) -> dict:
    from btp.benchmarks.latency import make_scans
    from btp.benchmarks.machine import describe_machine
    from btp.export.triton import export_repository, free_port, start_server, stop_server, wait_ready
    from btp.runtime import Pipeline

    scans = make_scans(points, n_scans)
    pipe = Pipeline(model_onnx)
    pipe(scans[0])  # warm-up
    ref_ms = []
    t0 = time.perf_counter()
    for s in scans * 3:
        t = time.perf_counter()
        pipe(s)
        ref_ms.append((time.perf_counter() - t) * 1e3)
    ref_stats = summarize(ref_ms)
    ref = {"scans_per_s": len(ref_ms) / (time.perf_counter() - t0), "p50_ms": ref_stats.p50, "p90_ms": ref_stats.p90}
    del pipe
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = export_repository(model_onnx, tmp / "repo")
        ports = [free_port() for _ in range(3)]
        proc = start_server(repo, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                            log_path=tmp / "server.log")
        try:
            wait_ready(proc, ports[0])
            for protocol in protocols:
                port = ports[0] if protocol == "http" else ports[1]
                load_run(protocol, port, scans, 1, 2.0)  # warm-up, not recorded
                for c in concurrency:
                    progress(f"{protocol} x{c}")
                    rows.append(load_run(protocol, port, scans, c, duration_s))
            killed = killed_client_check(ports[0], scans[0], tmp)
            alive = proc.poll() is None
        finally:
            stop_server(proc)
    return {"machine": describe_machine(), "model": str(model_onnx), "points": points, "scans": n_scans,
            "duration_s": duration_s, "in_process": ref, "rows": rows, "killed_client": killed,
            "server_alive_at_end": alive, "server": "tritonserver from PyPI nvidia-pytriton 0.7.0 (Python backend, "
                                                    "CPU, one model instance)"}


def serve_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    m = data["machine"]
    ref = data["in_process"]
    lines = ["# btp on NVIDIA Triton: load test", "", f"- Machine: {machine_line(m)}",
             f"- Date (UTC): {m['date_utc']}", f"- Server: {data['server']}, on 127.0.0.1; model `{Path(data['model']).name}`",
             f"- Scans: {data['scans']} different raw scans of {data['points']:,} points (sampled from a real mesh); "
             f"every {BAD_EVERY}th request a 3-point scan that must be rejected; {data['duration_s']:.0f} s per row "
             "after a 2 s warm-up; one tritonclient client per thread.",
             f"- Reference, in-process `btp.runtime.Pipeline` (what `btp-run` runs), serial: "
             f"{ref['scans_per_s']:.1f} scans/s, p50 {ref['p50_ms']:.1f} ms, p90 {ref['p90_ms']:.1f} ms.", "",
             "| protocol | clients | scans/s | p50 ms | p90 ms | p99 ms | bad scans rejected | unexpected errors | every id answered once |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['protocol']} | {r['concurrency']} | {r['scans_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['bad_requests_rejected']} | {r['unexpected_errors']} | "
                     f"{'yes' if r['every_id_answered_once'] else 'NO'} ({r['ids']} ids) |")
    k = data["killed_client"]
    lines += ["", f"- A client killed (SIGKILL) with 200 requests in flight: the server answered the next request "
                  f"{'yes' if k['answered_after_kill'] else 'NO'} ({k['seconds_to_answer']} s, while it finished the "
                  f"abandoned ones); server alive at the end: {'yes' if data['server_alive_at_end'] else 'NO'}.",
              "- One model instance on a 2-core CPU: the server runs one scan at a time, so more clients add queueing "
              "latency, not throughput; the ratio to the in-process rate is the serving overhead (serialisation, "
              "Python stub, copies)."]
    return "\n".join(lines) + "\n"
