"""Terminal output: a rich progress bar on a TTY; sparse plain lines otherwise (CI, SLURM
logs), where a redrawn bar would fill the log with control characters."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=False)


class TrainingProgress:
    def __init__(self, title: str, total_steps: int, plain_lines: int = 10):
        self.title, self.total = title, max(total_steps, 1)
        self.interactive = console.is_terminal
        self.start = time.perf_counter()
        self.next_line = 0
        self.line_every = max(1, self.total // plain_lines)
        if self.interactive:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                transient=False)
            self.task = self.bar.add_task(title, total=self.total, info="")
            self.bar.start()

    def update(self, step: int, **figures) -> None:
        """Called at log steps with the latest figures (no host syncs of its own)."""
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        info = "  ".join(f"{k} {v:.4g}" for k, v in figures.items() if v == v) + f"  {rate:.1f} steps/s"
        if self.interactive:
            self.bar.update(self.task, completed=step, info=info)
        elif step >= self.next_line:
            print(f"{self.title}  step {step}/{self.total}  {info}", flush=True)
            self.next_line = step + self.line_every

    def close(self) -> None:
        if self.interactive:
            self.bar.stop()
        sys.stdout.flush()
