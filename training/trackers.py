"""A file tracker for accelerate: metrics as CSV (long format) and JSON Lines.

Registered with `Accelerator(log_with=[FileTracker(dir), ...])`; TensorBoard is added
beside it only when `tensorboard` is importable. Rows are `step, key, value` in
`metrics.csv` (one row per number, so train and validation metrics that arrive at
different steps share one file) and one JSON object per `log()` call in `metrics.jsonl`.
On resume, rows logged after the resumed step are dropped first, so the files read as
one uninterrupted run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker


class FileTracker(GeneralTracker):
    """CSV + JSONL metrics under `logging_dir` (main process only)."""

    name = "m2_files"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | Path, resume_step: int | None = None):
        super().__init__()
        self.dir = Path(logging_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        self.jsonl_path = self.dir / "metrics.jsonl"
        if resume_step is None:
            for p in (self.csv_path, self.jsonl_path):
                p.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        new = not self.csv_path.exists()
        self._csv_file = open(self.csv_path, "a", newline="")  # noqa: SIM115 (kept open)
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "key", "value"])
        self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115

    @property
    def tracker(self) -> FileTracker:
        return self

    def store_init_configuration(self, values: dict) -> None:
        tmp = self.dir / "config.json.tmp"
        tmp.write_text(json.dumps(values, indent=1, default=str))
        os.replace(tmp, self.dir / "config.json")

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}
        for k, v in numbers.items():
            self._csv.writerow([step, k, f"{v:.6g}" if isinstance(v, float) else v])
        self._jsonl.write(json.dumps({"step": step, **numbers}) + "\n")
        self._csv_file.flush()
        self._jsonl.flush()

    def finish(self) -> None:
        self._csv_file.close()
        self._jsonl.close()

    def _truncate_after(self, step: int) -> None:
        if self.jsonl_path.exists():
            rows = [r for r in self.jsonl_path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if _step_of(json.loads(r).get("step")) <= step]
            _rewrite(self.jsonl_path, "".join(r + "\n" for r in keep))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            keep = rows[:1] + [r for r in rows[1:] if _step_of(r[0]) <= step]
            tmp = self.csv_path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)
            os.replace(tmp, self.csv_path)


def _step_of(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _rewrite(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def available_trackers(logging_dir: str | Path, resume_step: int | None) -> list:
    """Our file tracker, plus "tensorboard" when the package is importable."""
    trackers: list = [FileTracker(logging_dir, resume_step)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        trackers.append("tensorboard")
    return trackers
