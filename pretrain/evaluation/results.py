"""The per-sample results file of a code evaluation: appended as samples finish, read back to resume.

`humaneval.jsonl` holds one JSON object per finished sample (task_id,
sample, completion, passed, kind, ...), written and flushed as soon as
the sandbox has scored it, so an evaluation killed at any moment loses at
most the samples in flight. Beside it, `humaneval.settings.json` records
what produced them (model, problems file, sampling, limits); resuming
into a directory whose settings differ is refused rather than mixing two
evaluations in one file.
"""

import json
import os
from pathlib import Path

from pretrain.errors import UserError

RESULTS = "humaneval.jsonl"
SETTINGS = "humaneval.settings.json"


class ResultsFile:
    """Finished samples of one evaluation directory, keyed by (task_id, sample index)."""

    def __init__(self, out_dir: Path, settings: dict):
        self.path = out_dir / RESULTS
        self.settings_path = out_dir / SETTINGS
        out_dir.mkdir(parents=True, exist_ok=True)
        self._check_settings(settings)
        self.rows = self._read()
        self._file = open(self.path, "a", encoding="utf-8")

    def done(self, task_id: str, sample: int) -> bool:
        return (task_id, sample) in self.rows

    def add(self, row: dict) -> None:
        """Append one scored sample and push it to disk before anything else happens."""
        self.rows[(row["task_id"], row["sample"])] = row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def _check_settings(self, settings: dict) -> None:
        if self.settings_path.is_file():
            saved = json.loads(self.settings_path.read_text())
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise UserError(
                    f"{self.settings_path.parent} holds an evaluation with other settings ({', '.join(changed)} "
                    "differ); pass another --out, or the same settings to resume it"
                )
            return
        tmp = self.settings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.settings_path)

    def _read(self) -> dict[tuple[str, int], dict]:
        """Rows already scored; a last line torn by a kill is cut off so appends start on a clean line."""
        if not self.path.is_file():
            return {}
        rows, good_bytes = {}, 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                rows[(row["task_id"], row["sample"])] = row
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return rows
