"""`btp watch` (the hot-folder service) and `btp ledger export` (owned by btp.runtime; torch-free)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from btp.cli.run import backend_option

ledger_app = typer.Typer(name="ledger", help="The results ledger of `btp watch` / `btp-run --ledger`.",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def watch(
    in_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="The hot folder (watched recursively)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="model.onnx from btp-export (default: the "
                                         "default model the package carries)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: per-scan outputs and ledger.sqlite."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help="The ledger: an SQLite file (default: "
                                         "OUT/ledger.sqlite) or a PostgreSQL URL postgresql://USER@HOST/DB, "
                                         "for several stations in one database."),
    station: Optional[str] = typer.Option(None, "--station", help="This station's name in the ledger (default: "
                                          "the host name); stations sharing a database keep their files apart."),
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="HOST[:PORT] of an MQTT broker: each message is also "
                                       "published there with QoS 1 (needs the `line` extra: paho-mqtt)."),
    topic: str = typer.Option("btp/results", "--topic", help="MQTT topic of the messages."),
    mqtt_client_id: str = typer.Option("", "--mqtt-client-id", help="A fixed MQTT client id (a persistent "
                                       "session on the broker); default: a random one, clean session."),
    move_done: Optional[Path] = typer.Option(None, "--move-done", help="Move each scored file here "
                                             "(its path under IN_DIR kept)."),
    move_failed: Optional[Path] = typer.Option(None, "--move-failed", help="Move each file that failed here."),
    settle: float = typer.Option(2.0, "--settle", min=0.0, help="Seconds a file's size and time must hold still "
                                 "before it is taken (files named *.tmp / *.part are never taken)."),
    poll: float = typer.Option(0.5, "--poll", min=0.05, help="Seconds between two looks at IN_DIR."),
    batch: int = typer.Option(8, "--batch", min=1, help="At most this many scans per engine call, when "
                              "several are ready together."),
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t", help="Object-score threshold for OK/NG "
                                              "(default: the model's sidecar from `btp calibrate`, if any; not used with "
                                              "--reference: each part's own threshold decides)."),
    heatmap: List[str] = typer.Option(["png"], "--heatmap", help="ply | png | none, per scan (as btp-run)."),
    name_pattern: Optional[str] = typer.Option(None, "--name-pattern", help="Regular expression on the file name "
                                               "(without extension) with the groups (?P<serial>...) and optionally "
                                               "(?P<part>...); default: PART_SERIAL, the serial after the last "
                                               "underscore."),
    backend: str = backend_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    once: bool = typer.Option(False, "--once", help="Score what IN_DIR holds, then exit (no watching)."),
    reference: Optional[Path] = typer.Option(None, "--reference", "-r", help="PART.btpref from `btp reference "
                                             "build`, or a folder of them (one per part), loaded once: each scan is "
                                             "routed to its part as btp-run --reference routes it (a folder of its "
                                             "path named PART, else its file name's start, PART_*) and the part's "
                                             "fused score and threshold decide."),
) -> None:
    """Score every scan that lands in IN_DIR, exactly once: a JSON line per scan on stdout (and MQTT),
    a row per scan in the ledger. SIGTERM / Ctrl-C finish the scans in flight and exit; a restart
    skips what the ledger holds. Exit codes: 0 stopped; 2 unusable model, options or folders."""
    from btp.errors import BTPError
    from btp.io.files import file_sha256, remove_stale_temps
    from btp.runtime.calibration import CalibrationError, check_score_threshold, find_threshold
    from btp.runtime.ledger import LEDGER_NAME, NAME_PATTERN, Ledger, check_name_pattern
    from btp.runtime.outputs import check_output_dir
    from btp.runtime.pipeline import Pipeline
    from btp.runtime.reference import ROUTING_RULE
    from btp.runtime.watch import MQTT, STDOUT, Watcher, WatchOptions, log, stdout_sink, stop_on_signals
    from btp.cli.run import _split_heatmaps

    heatmaps = tuple(h for h in _split_heatmaps(heatmap) if h != "none")
    sinks, closers = {STDOUT: stdout_sink}, []
    try:
        pattern = check_name_pattern(name_pattern) if name_pattern else NAME_PATTERN
        if model is None:
            from btp.config import DEFAULT_MODEL_NAME
            from btp.io.locations import packaged_model

            model = packaged_model(DEFAULT_MODEL_NAME)
            if model is None:
                raise BTPError(f"this install of btp carries no {DEFAULT_MODEL_NAME}.onnx: pass --model model.onnx "
                               "from btp-export")
        model = model.resolve()
        for flag, folder in (("--out", out), ("--move-done", move_done), ("--move-failed", move_failed)):
            if folder is not None and folder.resolve() == in_dir.resolve():
                raise BTPError(f"{flag} {folder} is the watched folder itself; give another folder")
        check_output_dir(out)
        stale = remove_stale_temps(out)  # what atomic writes of a killed service left
        if stale:
            log(f"removed {len(stale)} temporary file(s) a killed run left in {out}")
        source = "--threshold"
        if threshold is not None:
            threshold = check_score_threshold(threshold, "--threshold")
        else:
            sidecar = find_threshold(model)
            if sidecar is not None:
                threshold, source = sidecar.value, f"sidecar (q={sidecar.quantile}, margin={sidecar.margin}, " \
                                                   f"{sidecar.n_scans} good scans)"
        pipeline = Pipeline(model, backend=backend, threads=threads, reference=reference)
        if pipeline.references is not None:  # every part's scorer now: a reference it cannot use stops the start
            for part, ref in sorted(pipeline.references.refs.items()):
                pipeline.references.scorer(part)
                log(f"reference {part}: {ref.path} (threshold {ref.threshold:.4f}, from its good scans)")
            log(f"routing: {ROUTING_RULE}")
        book = Ledger(ledger or out / LEDGER_NAME, station=station)
        if mqtt:
            from btp.runtime.mqtt import MqttSink

            sink = MqttSink(mqtt, topic, client_id=mqtt_client_id, log=log)
            sinks[MQTT] = sink
            closers.append(sink.close)
            if not sink.wait_connected(5.0):
                log(f"MQTT broker {mqtt} not reachable yet: scoring goes on, the messages wait in the ledger")
    except (BTPError, CalibrationError, ValueError, OSError) as exc:
        typer.echo(f"btp watch: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if reference is not None:
        if threshold is not None:
            log(f"{source} is not used: with --reference each part's own threshold decides")
        threshold = None
    elif threshold is None:
        log("no object-score threshold (--threshold, or `btp calibrate` for a sidecar): verdict NONE for every scan")
    in_dir, out = in_dir.resolve(), out.resolve()  # the ledger's paths stay the same from any working folder
    move_done, move_failed = (p.resolve() if p is not None else None for p in (move_done, move_failed))
    options = WatchOptions(in_dir=in_dir, out=out, settle_s=settle, poll_s=poll, batch=batch, heatmaps=heatmaps,
                           threshold=threshold, threshold_source=source if threshold is not None else None,
                           move_done=move_done, move_failed=move_failed, name_pattern=pattern, backend=backend,
                           model_sha256=file_sha256(model))
    watcher = Watcher(pipeline=pipeline, options=options, ledger=book, sinks=sinks)
    stop_on_signals(watcher.stop)
    try:
        watcher.run(once=once)
    except KeyboardInterrupt:
        log("stopped at once (second stop request); the scans in flight are redone at the next start")
        raise typer.Exit(code=130) from None
    finally:
        for close in closers:
            close()
        book.close()


@ledger_app.command("export")
def export(
    ledger: str = typer.Argument(..., help="ledger.sqlite, the OUT folder of `btp watch` that holds it, or a "
                                  "PostgreSQL URL (postgresql://USER@HOST/DB)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only scans scored at or after this ISO date or "
                                        "time (UTC unless it says otherwise), e.g. 2026-12-07T06:00."),
    fmt: str = typer.Option("csv", "--format", "-f", help="csv | json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of stdout (atomically)."),
) -> None:
    """The ledger's rows as CSV or JSON, oldest first (regions and timings as JSON in CSV cells)."""
    from btp.io.files import atomic_write_bytes
    from btp.runtime.ledger import LedgerError, open_existing

    try:
        with open_existing(ledger) as book:
            text = book.export(fmt, since)
    except LedgerError as exc:
        typer.echo(f"btp ledger export: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_bytes(out, text.encode())
