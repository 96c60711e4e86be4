"""What a run writes, and how: every file lands whole (temp file in the same folder, then
rename), so a reader — `stabbench report` on a live sweep, a person with `tail` — never
sees half a file, and a kill mid-write leaves the previous version intact."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

# A run's status: these three have a summary.json; "partial" (no summary yet) and "unreadable"
# (a summary that cannot be read) are counted in the report but never averaged.
FINISHED = ("complete", "diverged", "exploded")
METRICS_COLUMNS = ["step", "epoch", "stage", "seed", "lr", "split", "loss", "acc", "time_s"]
LAYER_COLUMNS = ["step", "epoch", "stage", "seed", "lr", "layer", "kind", "grad_norm", "weight_norm", "act_mean", "act_std"]


def finite_or_none(value):
    """JSON has no NaN/inf: a diverged or undefined figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a results file is for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value))


def records_digest(frame: pd.DataFrame, columns: list[str] | None = None) -> dict:
    """Columns and a digest of their values, the same for the rows in memory and for the same
    rows read back from their CSV (numbers as float64, NaN as itself, text as text)."""
    import hashlib

    columns = list(frame.columns) if columns is None else columns
    digest = hashlib.sha256()
    for column in columns:
        if column not in frame:
            return {"columns": columns, "digest": f"missing {column}"}
        values = frame[column]
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        text = values.where(values.isna() | np.isnan(numbers), "")  # what is not a number, as text
        missing = np.isnan(numbers)
        digest.update(np.where(missing, 0.0, numbers).tobytes() + missing.tobytes())
        digest.update("\x1f".join("" if v is None or v != v else str(v) for v in text).encode())
    return {"columns": columns, "digest": digest.hexdigest()}


class RunRecorder:
    """Collects metrics and per-layer rows in memory; `flush` rewrites both CSVs whole."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.metric_rows: list[dict] = []
        self.layer_frames: list[pd.DataFrame] = []

    def metrics(self, **row) -> None:
        self.metric_rows.append(row)

    def layers(self, frame: pd.DataFrame) -> None:
        self.layer_frames.append(frame)

    def metrics_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.metric_rows)
        extra = [c for c in frame.columns if c not in METRICS_COLUMNS]
        return frame.reindex(columns=METRICS_COLUMNS + extra)

    def layers_frame(self) -> pd.DataFrame:
        if not self.layer_frames:
            return pd.DataFrame(columns=LAYER_COLUMNS)
        frame = pd.concat(self.layer_frames, ignore_index=True)
        extra = [c for c in frame.columns if c not in LAYER_COLUMNS]
        return frame.reindex(columns=LAYER_COLUMNS + extra)

    def row_counts(self) -> dict[str, int]:
        return {"metrics": len(self.metric_rows), "layers": sum(len(f) for f in self.layer_frames)}

    def digests(self) -> dict[str, dict]:
        """What a checkpoint remembers of the records it continues: per file, its columns and a
        digest of their values, checked on resume (`reload`)."""
        return {"metrics": records_digest(self.metrics_frame()), "layers": records_digest(self.layers_frame())}

    def reload(self, counts: dict[str, int], digests: dict | None = None) -> None:
        """Resume: take back the rows written up to a checkpoint (rows are only ever appended,
        so the first `counts` rows of each file are exactly the checkpoint's). A file that is
        missing, unreadable, shorter than that or whose rows differ from what the checkpoint
        saw (truncated, edited) is refused: continuing from it would report a complete run
        with missing or garbage rows."""
        from stabbench.errors import UserError

        frames = {}
        for kind in ("metrics", "layers"):
            path = self.out_dir / f"{kind}.csv"
            fix = f"delete {self.out_dir / 'checkpoint.pt'} (and {path.name}) to start the run afresh"
            if not path.is_file():
                raise UserError(f"{self.out_dir} has a checkpoint but no {path.name} to resume; {fix}")
            try:
                frame = pd.read_csv(path, low_memory=False).head(counts[kind])
            except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
                raise UserError(f"{path} cannot be read to resume the checkpoint ({type(error).__name__}); "
                                f"{fix}") from None
            if kind == "layers":
                # The diagnostics are float32 on the device; read back as float32 they print as before.
                # (lr is the config's float64, not a diagnostic: it stays as written)
                frame = frame.astype({c: "float32" for c in frame.columns if frame[c].dtype == "float64" and c != "lr"})
            expected = (digests or {}).get(kind)
            if len(frame) < counts[kind] or (expected is not None and records_digest(frame, expected["columns"]) != expected):
                raise UserError(f"{path} does not hold the {counts[kind]} rows its checkpoint continues "
                                f"(truncated or changed since); {fix}")
            frames[kind] = frame
        self.metric_rows = [{k: v for k, v in row.items() if not pd.isna(v) or k in METRICS_COLUMNS}
                            for row in frames["metrics"].to_dict("records")]
        self.layer_frames = [frames["layers"]]

    def flush(self) -> None:
        write_csv(self.out_dir / "metrics.csv", self.metrics_frame())
        write_csv(self.out_dir / "layers.csv", self.layers_frame())
