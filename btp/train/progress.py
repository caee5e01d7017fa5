"""Progress display for training loops: a rich bar on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, name: str, total: int, start: int = 0, enabled: bool = True, log_every_s: float = 30.0,
                 bar: bool = True):
        """enabled: show anything (False on non-main DDP ranks); bar: a rich bar when on a terminal,
        else (or with bar=False) one log line every ``log_every_s`` seconds."""
        self.name, self.total, self.start, self.enabled, self.bar = name, total, start, enabled, bar
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

    def update(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        info = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
            return
        now = time.time()
        if now - self._last_log >= self.log_every_s or step == self.total:
            self._last_log = now
            elapsed = now - self._t0
            done = step - self.start
            eta = f", ETA {elapsed / done * (self.total - step) / 60:.1f} min" if done > 0 else ""
            print(f"[{self.name}] step {step}/{self.total} {info} ({elapsed:.0f} s{eta})", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)
        return False
