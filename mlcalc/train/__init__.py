"""Training and fine-tuning of mlcalc models, and an OC20-style EMT data set to train them on.

``generate_emt_dataset(path, seed, size)`` writes the data set (``mlcalc.train.data``); ``fit(TrainConfig...)``
trains any registered model on an ASE database, or fine-tunes a checkpoint, reusing the calculator's graph building
and force path (``mlcalc.train.loop``); the config keys are documented in ``mlcalc.train.config``.
"""

from mlcalc.train.config import TrainConfig
from mlcalc.train.data import DatasetSummary, generate_emt_dataset, load_split, read_db
from mlcalc.train.loop import FitResult, fit

__all__ = ["DatasetSummary", "FitResult", "TrainConfig", "fit", "generate_emt_dataset", "load_split", "read_db"]
