"""A CSV logger whose metrics survive a resume.

Lightning's CSVLogger deletes `metrics.csv` when a new process opens a folder that has one,
so a job resumed after a kill or a pre-emption would keep only the epochs after the resume.
This one reads the earlier rows back first and writes them out again with the new ones.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from spineseg.utils.io import atomic_open


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._earlier = False
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
        self.metrics = rows + self.metrics
        self._earlier = True  # the file stays as it is until the first save replaces it

    def save(self) -> None:
        if not self._earlier:
            return super().save()
        self._record_new_keys()
        with atomic_open(self.metrics_file_path, "w") as fh:  # old rows + new, in one step
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics, self._earlier = [], False
        return None


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger`, keeping the rows of earlier runs of the job."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
