"""Command line: ``mlcalc info CKPT``, ``mlcalc relax CKPT STRUCTURE``, ``mlcalc md CKPT STRUCTURE``.

Common options (``--device``, ``--dtype``, ``-v``) go before or after the subcommand. relax writes a trajectory and
an optimiser log per run, md a trajectory and a per-step log (time, energies, temperature). Errors are reported in
one line (``-v`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

logger = logging.getLogger(__name__)

#: value of --trajectory / --log that turns the file off
NONE_VALUES = ("none", "off", "")


class CLIError(Exception):
    """An error the command line reports in one line (bad input, not a bug)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage on -h only)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


# -- option value types ------------------------------------------------------------------------------------------
def _number(kind: type, low: float, inclusive: bool, what: str):
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not np.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_float = _number(float, 0.0, False, "a number > 0")
nonnegative_float = _number(float, 0.0, True, "a number >= 0")
positive_int = _number(int, 1, True, "an integer >= 1")


def frame_index(text: str) -> str:
    """An ase.io.read index ('0', '-1', ':', '2:5', '::2'); kept as text for ase."""
    from ase.io.formats import string2index

    try:
        index = string2index(text)
    except ValueError:
        index = None
    if not isinstance(index, (int, slice)):
        raise argparse.ArgumentTypeError(f"expected a frame index such as 0, -1, : or 2:5, got {text!r}")
    return text


CHECKPOINT_HELP = (
    "fairchem v1 or mlcalc checkpoint file (.pt), or a released checkpoint name such as GemNet-OC-S2EF-OC20-All+MD "
    "(downloaded once into the cache; `mlcalc pretrained` lists them)"
)


# -- helpers -----------------------------------------------------------------------------------------------------
def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} file not found: {path}")
    if not p.is_file():
        raise CLIError(f"{what} path is not a file: {path}")
    return p


def _resolve_checkpoint(args: argparse.Namespace) -> None:
    """A file must exist; a released checkpoint name is fetched into the cache now (a failed download is one line),
    so loading it later finds it there."""
    from mlcalc import pretrained

    try:
        pretrained.resolve(args.checkpoint, progress=not args.no_progress)
    except (FileNotFoundError, pretrained.DownloadError) as err:
        raise CLIError(str(err)) from None
    if Path(args.checkpoint).exists():
        _require_file(args.checkpoint, "checkpoint")


def _check_inputs(args: argparse.Namespace) -> None:
    """Both files exist (a checkpoint name is fetched into the cache) and the checkpoint comes first."""
    from mlcalc.checkpoint import is_torch_file

    _resolve_checkpoint(args)
    _require_file(args.structure, "structure")
    if not is_torch_file(args.checkpoint) and is_torch_file(args.structure):
        raise CLIError(
            f"arguments swapped? {args.structure} is a torch checkpoint and {args.checkpoint} is not; usage: "
            f"mlcalc {args.cmd} CHECKPOINT STRUCTURE"
        )


def _calculator(args: argparse.Namespace):
    """The family calculator of the checkpoint's model (GemNetOCCalculator, ...), with its notes."""
    from mlcalc.calculator import load_calculator

    return load_calculator(args.checkpoint, device=args.device, dtype=args.dtype,
                           matmul_precision=args.matmul_precision, skin=getattr(args, "skin", 0.0),
                           compile=args.compile)


def _read_frames(path: str, index: str) -> list:
    from ase.io import read

    try:
        frames = read(path, index=index)
    except (StopIteration, IndexError) as err:  # ase's way of saying the index is past the last frame
        try:
            count = len(read(path, index=":"))
        except Exception:  # noqa: BLE001 - the count is only for the message
            count = None
        have = f"; the file has {count} frame(s)" if count is not None else ""
        raise CLIError(f"--index {index} selects no frame of {path}{have}") from err
    except Exception as err:  # noqa: BLE001 - ase raises many types for unreadable files
        raise CLIError(f"cannot read structure file {path} (index {index}): {_one_line(err)}") from err
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise CLIError(f"index {index} selects no frame of {path}")
    return frames


def _tag_frames(args: argparse.Namespace, frames: list) -> None:
    """--tag: OC20 tags from geometry (mlcalc.tag_adsorbate_slab), adsorbate from --adsorbate or found."""
    if not args.tag:
        if args.adsorbate is not None:
            raise CLIError("--adsorbate is used with --tag")
        return
    from mlcalc.tags import tag_adsorbate_slab

    for k, atoms in enumerate(frames):
        try:
            tag_adsorbate_slab(atoms, adsorbate_indices=args.adsorbate)
        except ValueError as err:
            raise CLIError(f"--tag, frame {k}: {err}" if len(frames) > 1 else f"--tag: {err}") from None
        logger.info("frame %d tags: %s", k, atoms.get_tags().tolist())


def index_list(text: str) -> list[int]:
    """argparse type: comma-separated atom indices such as 16,17."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated atom indices such as 16,17, got {text!r}") from None


def _output_path(value: str | None, structure: str, suffix: str) -> Path | None:
    """The file to write: the option's value, None when turned off, else STEM-suffix in the current directory."""
    if value is not None and value.strip().lower() in NONE_VALUES:
        return None
    if value is not None:
        return Path(value)
    return Path(f"{Path(structure).stem}-{suffix}")


def _numbered(path: Path | None, k: int, n: int) -> Path | None:
    """path for frame k of n (unchanged for one frame, STEM-k.SUFFIX otherwise)."""
    if path is None or n == 1:
        return path
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def _progress(args: argparse.Namespace, total: int, desc: str):
    from tqdm import tqdm

    # disable=None: shown only when stderr is a terminal
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                disable=True if args.no_progress else None)


def _freeze_results(atoms: Any) -> None:
    """Replace a (shared) calculator by a SinglePointCalculator holding this structure's own results."""
    from ase.calculators.singlepoint import SinglePointCalculator

    results = {k: v for k, v in atoms.calc.results.items() if k in ("energy", "free_energy", "forces", "stress")}
    atoms.calc = SinglePointCalculator(atoms, **results)


def _check_frames(calc: Any, frames: list) -> None:
    """Validate every frame before any output file is opened (one-line error naming the frame)."""
    for k, atoms in enumerate(frames):
        try:
            calc.check_atoms(atoms)
        except ValueError as err:
            raise CLIError(f"frame {k}: {err}" if len(frames) > 1 else str(err)) from None


def _report_written(**paths: list) -> None:
    """One line naming the files written, e.g. ``wrote trajectory a.traj, log a.log``."""
    parts = []
    for what, items in paths.items():
        names = [str(p) for p in items if p]
        if names:
            shown = names if len(names) <= 3 else [names[0], "...", names[-1]]
            parts.append(f"{what} {' '.join(shown)}")
    if parts:
        print(f"wrote {', '.join(parts)}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# -- commands ----------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint is: model, cutoff, properties, notes, hyperparameters, metadata (JSON)."""
    from mlcalc import read_checkpoint

    _resolve_checkpoint(args)
    ck = read_checkpoint(args.checkpoint)
    calc = _calculator(args)
    info = dict(calc.info)
    info["calculator"] = type(calc).__name__
    info["hparams"] = ck.hparams
    info["n_parameters"] = sum(p.numel() for p in calc.model.parameters())
    info["metadata"] = ck.metadata
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    """List the released checkpoints, show one's facts, or download one into the cache (--download)."""
    from mlcalc import pretrained

    if args.name is None:
        if args.download:
            raise CLIError("--download needs a checkpoint NAME")
        rows = [pretrained.info(n) for n in pretrained.available()]
        width = max(len(r.name) for r in rows)
        print(f"{'name':<{width}}  family     data          task   energy      forces")
        for r in rows:
            print(f"{r.name:<{width}}  {r.family:<9}  {r.data:<12}  {r.task:<5}  {r.energy:<10}  {r.forces}")
        print(f"cache: {pretrained.default_cache_dir()} ($MLCALC_CACHE)")
        return 0
    try:
        entry = pretrained.info(args.name)
    except KeyError as err:
        raise CLIError(err.args[0]) from None
    facts = entry.as_dict()
    path = pretrained.cached_path(entry.name)
    if args.download:
        try:
            path = pretrained.get_checkpoint(entry.name, progress=not args.no_progress)
        except pretrained.DownloadError as err:
            raise CLIError(str(err)) from None
    facts["cached"] = str(path) if path.exists() else None
    print(json.dumps(facts, indent=2))
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    """BFGS relaxation (positions, or positions and cell with --cell) of every selected frame."""
    from ase.filters import FrechetCellFilter
    from ase.io import write
    from ase.optimize import BFGS

    from mlcalc.calculator import NO_STRESS_DIRECT_MESSAGE

    _check_inputs(args)
    frames = _read_frames(args.structure, args.index)
    _tag_frames(args, frames)
    calc = _calculator(args)
    n = len(frames)
    _check_frames(calc, frames)
    if args.cell:
        if "stress" not in calc.implemented_properties:
            reason = NO_STRESS_DIRECT_MESSAGE if calc.model.direct_forces else "the model gives no stress"
            raise CLIError(f"--cell needs stress: {reason}")
        flat = [k for k, a in enumerate(frames) if a.cell.rank < 3 or not a.pbc.all()]
        if flat:
            raise CLIError(f"--cell needs a 3-D periodic cell; frame(s) {flat[:10]} of {args.structure} have none")
    traj_path = _output_path(args.trajectory, args.structure, "relax.traj")
    log_path = _output_path(args.log, args.structure, "relax.log")
    traj_paths = [_numbered(traj_path, k, n) for k in range(n)]
    all_converged = True
    log = open(log_path, "w") if log_path is not None else None  # one log for all frames
    try:
        for k, atoms in enumerate(frames):
            atoms.calc = calc
            target = FrechetCellFilter(atoms) if args.cell else atoms
            e0 = atoms.get_potential_energy()
            if log is not None:
                log.write(f"# frame {k} of {args.structure} ({atoms.get_chemical_formula()})\n")
            traj_k = traj_paths[k]
            opt = BFGS(target, logfile=log, trajectory=str(traj_k) if traj_k is not None else None)
            bar = _progress(args, args.steps, f"relax {k + 1}/{n}" if n > 1 else "relax")
            opt.attach(lambda bar=bar, opt=opt: bar.update(opt.nsteps - bar.n), interval=1)
            try:
                converged = bool(opt.run(fmax=args.fmax, steps=args.steps))
            finally:
                bar.close()
                if log is not None:
                    log.flush()
            fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
            prefix = f"frame {k}: " if n > 1 else ""
            print(f"{prefix}E0 = {e0:.6f} eV  E = {atoms.get_potential_energy():.6f} eV  max|F| = {fmax:.4f} eV/Å  "
                  f"steps = {opt.nsteps}  converged = {converged}")
            all_converged &= converged
            _freeze_results(atoms)
    finally:
        if log is not None:
            log.close()
    if args.output:
        write(args.output, frames if n > 1 else frames[0])
    _report_written(trajectory=traj_paths, log=[log_path], output=[args.output])
    return 0 if all_converged else 1


def _thermalize(atoms: Any, temperature: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta with the installed ASE's current API (thermalize_momenta since ASE 3.29)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:  # ASE < 3.29
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)


def cmd_md(args: argparse.Namespace) -> int:
    """Langevin MD of one frame: per-step log (energies, temperature), trajectory every --every steps."""
    from ase import units
    from ase.io.trajectory import Trajectory
    from ase.md import MDLogger
    from ase.md.langevin import Langevin

    _check_inputs(args)
    frames = _read_frames(args.structure, args.index)
    if len(frames) > 1:
        raise CLIError(f"md runs one structure; index {args.index} selects {len(frames)} frames (use --index N)")
    _tag_frames(args, frames)
    atoms = frames[0]
    atoms.calc = _calculator(args)
    _check_frames(atoms.calc, frames)
    rng = np.random.default_rng(args.seed)
    _thermalize(atoms, args.temperature, rng)
    dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=args.temperature,
                   friction=args.friction / units.fs, rng=rng, fixcm=False)
    traj_path = _output_path(args.trajectory, args.structure, "md.traj")
    log_path = _output_path(args.log, args.structure, "md.log")
    traj = Trajectory(str(traj_path), "w", atoms) if traj_path is not None else None
    if traj is not None:
        dyn.attach(traj.write, interval=args.every)
    if log_path is not None:
        dyn.attach(MDLogger(dyn, atoms, str(log_path), header=True, mode="w"), interval=1)
    bar = _progress(args, args.steps, "md")
    dyn.attach(lambda: bar.update(dyn.nsteps - bar.n), interval=1)
    try:
        for k in range(0, args.steps, args.every):
            dyn.run(min(args.every, args.steps - k))
            epot, temp = atoms.get_potential_energy(), atoms.get_temperature()
            bar.clear()
            print(f"step {dyn.nsteps:6d}  Epot = {epot:.5f} eV  T = {temp:.1f} K", flush=True)
    finally:
        bar.close()
        if traj is not None:
            traj.close()
    _report_written(trajectory=[traj_path], log=[log_path])
    return 0


# -- parser ------------------------------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--device/--dtype/-v/--no-progress; on subcommands with SUPPRESS defaults so they never undo the main ones."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--device", default=default("auto"), help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=default("float32"), choices=["float32", "float64"])
    parser.add_argument("--matmul-precision", default=default("highest"), choices=["highest", "high", "medium"],
                        help="float32 matmul precision of the model (medium: bfloat16 matmuls; default highest)")
    parser.add_argument("--compile", action="store_true", default=default(False),
                        help="torch.compile the model (first call compiles; then faster)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="info logging; show tracebacks of errors")
    parser.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The mlcalc argument parser (info, pretrained, relax, md, data, train)."""
    parser = _Parser(prog="mlcalc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser,
                                metavar="{info,pretrained,relax,md,data,train}")

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _add_common(p, suppress=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pretrained", help="list the released checkpoints, or show/download one by name")
    p.add_argument("name", nargs="?", help="a registry name (default: list them all)")
    p.add_argument("--download", action="store_true", help="download NAME into the cache and print its path")
    _add_common(p, suppress=True)
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("relax", help="BFGS relaxation of a structure file (every frame, or --index)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("structure", help="structure file ase.io.read can read (extxyz, CIF, POSCAR, traj, ...)")
    p.add_argument("--fmax", type=positive_float, default=0.05, help="eV/Å (default 0.05)")
    p.add_argument("--steps", type=positive_int, default=500, help="maximum BFGS steps per frame")
    p.add_argument("--cell", action="store_true", help="relax the cell too (needs stress: gradient-force models)")
    p.add_argument("--index", type=frame_index, default=":", help="frames to relax (ase.io.read index, default all)")
    p.add_argument("-o", "--output", help="write the relaxed structure(s) here")
    p.add_argument("--trajectory", help="ase trajectory (default STEM-relax.traj; 'none' for none)")
    p.add_argument("--log", help="optimiser log (default STEM-relax.log; 'none' for none)")
    p.add_argument("--tag", action="store_true",
                   help="set OC20 tags (0 sub-surface, 1 surface, 2 adsorbate) from geometry before running; "
                        "GemNet-OC OC20/OC22 checkpoints need them (mlcalc.tag_adsorbate_slab)")
    p.add_argument("--adsorbate", type=index_list, default=None, metavar="I,J,...",
                   help="adsorbate atom indices for --tag (default: found from geometry)")
    _add_common(p, suppress=True)
    p.set_defaults(func=cmd_relax)

    p = sub.add_parser("md", help="Langevin MD of a structure file")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("structure", help="structure file ase.io.read can read (extxyz, CIF, POSCAR, traj, ...)")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--every", type=positive_int, default=10, help="print and write a frame every N steps")
    p.add_argument("--timestep", type=positive_float, default=1.0, help="fs")
    p.add_argument("--temperature", type=nonnegative_float, default=300.0, help="K")
    p.add_argument("--friction", type=nonnegative_float, default=0.001,
                   help="Langevin friction, 1/fs (default 0.001 = 1/ps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skin", type=nonnegative_float, default=1.0,
                   help="neighbour-list skin in Å: candidate pairs reused until an atom moved skin/2 (results "
                        "bit-identical; 0 rebuilds every step; default 1.0)")
    p.add_argument("--index", type=frame_index, default="-1", help="frame to run (default the last)")
    p.add_argument("--trajectory", help="ase trajectory (default STEM-md.traj; 'none' for none)")
    p.add_argument("--log", help="per-step log: time, energies, T (default STEM-md.log; 'none' for none)")
    p.add_argument("--tag", action="store_true",
                   help="set OC20 tags (0 sub-surface, 1 surface, 2 adsorbate) from geometry before running; "
                        "GemNet-OC OC20/OC22 checkpoints need them (mlcalc.tag_adsorbate_slab)")
    p.add_argument("--adsorbate", type=index_list, default=None, metavar="I,J,...",
                   help="adsorbate atom indices for --tag (default: found from geometry)")
    _add_common(p, suppress=True)
    p.set_defaults(func=cmd_md)

    from mlcalc.train.cli import add_data_parser, add_train_parser

    add_data_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 not converged, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"mlcalc {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        if args.verbose:
            raise
        kind = "" if isinstance(err, (CLIError, ValueError, OSError)) else f"{type(err).__name__}: "
        print(f"mlcalc {args.cmd}: error: {kind}{_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
