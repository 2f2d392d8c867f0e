"""Per-epoch training log as CSV (fixed columns) or JSON lines; truncated to the resumed epoch on resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "epoch", "lr", "train_loss", "train_energy_loss", "train_force_loss", "val_loss", "val_energy_loss",
    "val_force_loss", "val_energy_mae", "val_energy_per_atom_mae", "val_forces_mae", "best", "seconds",
)  # fmt: skip


class EpochLog:
    """Rows {column: value}: epoch, learning rate at the epoch's start, mean training loss terms (normalised units),
    validation loss terms and MAEs (eV, eV/atom, eV/Å) when validated, ``best`` (this epoch improved the metric)
    and wall seconds."""

    def __init__(self, path: Path, fmt: str) -> None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"log format must be 'csv' or 'jsonl', got {fmt!r}")
        self.path = Path(path)
        self.fmt = fmt

    def reset(self) -> None:
        """Start an empty log (a CSV gets its header)."""
        self._write([])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "w", newline="") as fh:
            if self.fmt == "csv":
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            else:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            if self.fmt == "csv":
                csv.DictWriter(fh, fieldnames=COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})
            else:
                fh.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Rows with numbers as floats (epoch int, best bool); empty cells are left out."""
        if not self.path.is_file():
            return []
        if self.fmt == "jsonl":
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        with open(self.path, newline="") as fh:
            for raw in csv.DictReader(fh):
                row: dict[str, Any] = {}
                for key, value in raw.items():
                    if value in ("", None):
                        continue
                    if key == "epoch":
                        row[key] = int(value)
                    elif key == "best":
                        row[key] = value == "True"
                    else:
                        row[key] = float(value)
                rows.append(row)
        return rows

    def truncate(self, epoch: int) -> None:
        """Keep rows up to ``epoch`` (rows written after the last saved training state are dropped on resume)."""
        rows = [r for r in self.read() if int(r["epoch"]) <= epoch]
        if self.fmt == "csv":
            rows = [{k: r.get(k, "") for k in COLUMNS} for r in rows]
        self._write(rows)
