"""Progress display for long loops (training stages, ``btp eval``): a rich bar on a terminal,
periodic log lines with an ETA otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, name: str, total: int | None, start: int = 0, enabled: bool = True, log_every_s: float = 30.0,
                 bar: bool = True, unit: str = "step"):
        """enabled: show anything (False on non-main DDP ranks); bar: a rich bar when on a terminal,
        else (or with bar=False) one log line every ``log_every_s`` seconds and at the end:
        ``[name] <unit> <step>/<total> <metrics> (<elapsed> s, ETA <m> min)``. ``total`` may be None
        until the first ``update(..., total=)``."""
        self.name, self.total, self.start, self.enabled, self.bar, self.unit = name, total, start, enabled, bar, unit
        self.log_every_s = log_every_s
        self._rich = None
        self._last_log = 0.0
        self._t0 = time.time()

    def __enter__(self):
        if self.enabled and self.bar and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      transient=False)
            self._rich.__enter__()
            self._task = self._rich.add_task(self.name, total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, total: int | None = None, **metrics) -> None:
        if not self.enabled:
            return
        if total is not None:
            self.total = total
        info = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self._rich is not None:
            self._rich.update(self._task, completed=step, total=self.total, info=info)
            return
        now = time.time()
        if now - self._last_log >= self.log_every_s or step == self.total:
            self._last_log = now
            elapsed = now - self._t0
            done = step - self.start
            known = self.total is not None and done > 0
            eta = f", ETA {elapsed / done * (self.total - step) / 60:.1f} min" if known else ""
            info = f" {info}" if info else ""
            print(f"[{self.name}] {self.unit} {step}/{self.total if self.total is not None else '?'}{info} "
                  f"({elapsed:.0f} s{eta})", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)
        return False
