"""``mlcalc data`` and ``mlcalc train``: sub-commands the main CLI (mlcalc.cli) registers.

``mlcalc data OUT.db --size full --seed 0`` writes the EMT data set and prints its summary as JSON.
``mlcalc train CONFIG.yaml [--resume] [--max-epochs N] [--KEY VALUE ...]`` trains; every config key is also a
flag (``--lr 3e-4``, ``--output-dir runs/x``, ``--freeze '["atom_emb.*"]'``), values parsed as YAML/JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from mlcalc.train.config import TrainConfig, read_mapping

logger = logging.getLogger(__name__)


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` on the main parser's sub-parsers; returns the new parser (func = cmd_data)."""
    p = subparsers.add_parser("data", help="generate the OC20-style EMT data set (an ASE database)")
    p.add_argument("output", help="ASE database file to write (.db)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-systems", type=int, default=None)
    p.add_argument("--frames-per-system", type=int, default=None)
    p.add_argument("--placements-per-system", type=int, default=None)
    p.add_argument("--max-atoms", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_data)
    return p


def cmd_data(args: argparse.Namespace) -> int:
    from mlcalc.train.data import generate_emt_dataset

    summary = generate_emt_dataset(
        args.output,
        seed=args.seed,
        size=args.size,
        n_systems=args.n_systems,
        frames_per_system=args.frames_per_system,
        placements_per_system=args.placements_per_system,
        max_atoms=args.max_atoms,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
    )
    print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train``: a config file plus one ``--key value`` flag per TrainConfig key (func = cmd_train)."""
    p = subparsers.add_parser("train", help="train or fine-tune a model from a YAML/TOML/JSON config")
    p.add_argument("config", help="training config (.yaml, .yml, .toml or .json); keys in mlcalc.train.config")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from latest.pt")
    p.add_argument("--max-epochs", type=int, default=None, help="stop this call after that epoch (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    keys = p.add_argument_group("config keys (override the file)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        keys.add_argument(flag, dest=f"cfg_{f.name}", default=argparse.SUPPRESS, metavar="VALUE")
    p.set_defaults(func=cmd_train)
    return p


def _parse_value(text: str) -> Any:
    """A flag's value as JSON (numbers like 1e-3, true/false/null, lists, mappings), else YAML, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - no PyYAML, or not YAML: keep the raw string
        return text


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file's keys with the command-line overrides applied (``--key value``)."""
    from pathlib import Path

    values = read_mapping(Path(args.config)) if args.config else {}
    for name, raw in vars(args).items():
        if name.startswith("cfg_"):
            values[name[4:]] = _parse_value(raw)
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from mlcalc.train.loop import fit

    config = config_from_args(args)
    result = fit(config, resume=args.resume, progress=not args.no_progress, max_epochs=args.max_epochs)
    print(
        json.dumps(
            {
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "metric": config.metric,
                "best_metrics": result.best_metrics,
                "last_epoch": result.last_epoch,
                "stopped_early": result.stopped_early,
                "best_model": str(result.best_model_path),
                "latest": str(result.latest_path),
                "log": str(result.log_path),
            },
            indent=2,
        )
    )
    return 0
