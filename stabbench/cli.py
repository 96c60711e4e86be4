"""`stabbench <subcommand> ...`. A subcommand is a function taking the remaining
arguments; adding one is one line in SUBCOMMANDS."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    # name: (module, function, one-line help)
    "run": ("stabbench.commands", "run", "train as configured; -m for a sweep (Hydra overrides, e.g. method=bsnn depth=200)"),
    "probe": ("stabbench.commands", "probe", "signal propagation at init, no training (same overrides as run)"),
    "bench": ("stabbench.commands", "bench", "time the runner against a tutorial-style loop on the same shape; writes bench.json"),
    "report": ("stabbench.report", "main", "tables and figures from runs and sweeps: stabbench report PATH... [--out DIR]"),
}

EXAMPLES = """
examples:
  stabbench run method=bsnn depth=200
  stabbench run -m method=baseline,snn,bsnn depth=50,100 seeds=4
  stabbench probe method=lyapunov depth=400 width=16
  stabbench report results/sweeps/<time>
  stabbench bench device=cpu depth=50 width=64 seeds=8"""

USAGE = "usage: stabbench <subcommand> [args...]   (stabbench <subcommand> --help for its options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # an ascii or latin-1 output: `?` for what it cannot show, never a traceback
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "")
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\nsubcommands:")
        for name, (_, _, text) in SUBCOMMANDS.items():
            print(f"  {name:<8} {text}")
        print(EXAMPLES)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"stabbench: error: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = SUBCOMMANDS[name]
    try:
        result = getattr(importlib.import_module(module), function)(rest)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside: a clean stop
        print(f"\nstabbench: stopped (Ctrl-C); {name} did not finish. A checkpointed run continues "
              f"when the same command is typed again", file=sys.stderr, flush=True)
        return 130
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
