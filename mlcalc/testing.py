"""Conformance kit reused by every model's tests: finite differences, invariances, random structures."""

from __future__ import annotations

import http.server
import threading

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator


def fd_forces(atoms: Atoms, calc: Calculator, h: float = 1e-4, indices: list[int] | None = None) -> np.ndarray:
    """Central finite-difference forces -dE/dx (N, 3) eV/Å (rows outside ``indices`` left at 0)."""
    a = atoms.copy()
    a.calc = calc
    out = np.zeros((len(a), 3))
    base = a.positions.copy()
    for i in range(len(a)) if indices is None else indices:
        for k in range(3):
            p = base.copy()
            p[i, k] += h
            a.positions = p
            ep = a.get_potential_energy()
            p[i, k] -= 2 * h
            a.positions = p
            em = a.get_potential_energy()
            out[i, k] = -(ep - em) / (2 * h)
    return out


def fd_stress(atoms: Atoms, calc: Calculator, h: float = 1e-5) -> np.ndarray:
    """Central finite-difference stress (Voigt, eV/Å³): dE/dε / V for symmetric strains ε, atoms moved with the cell."""
    a = atoms.copy()
    a.calc = calc
    cell0, pos0, vol = a.cell.array.copy(), a.positions.copy(), a.get_volume()
    full = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            vals = []
            for sign in (1, -1):
                eps = np.zeros((3, 3))
                eps[i, j] = eps[j, i] = sign * h / (1 if i == j else 2)
                deform = np.eye(3) + eps
                a.set_cell(cell0 @ deform, scale_atoms=False)
                a.positions = pos0 @ deform
                vals.append(a.get_potential_energy())
            full[i, j] = full[j, i] = (vals[0] - vals[1]) / (2 * h) / vol
    a.set_cell(cell0, scale_atoms=False)
    a.positions = pos0
    return np.array([full[0, 0], full[1, 1], full[2, 2], full[1, 2], full[0, 2], full[0, 1]])


def random_rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix (3, 3)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def rotated(atoms: Atoms, rot: np.ndarray) -> Atoms:
    """Copy of ``atoms`` with positions and cell rotated by ``rot`` (row vectors: x -> x @ rot.T)."""
    a = atoms.copy()
    a.positions = atoms.positions @ rot.T
    a.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    return a


def permuted(atoms: Atoms, seed: int) -> tuple[Atoms, np.ndarray]:
    """Copy of ``atoms`` with the atom order shuffled; returns (atoms, perm) so that new[k] = old[perm[k]]."""
    perm = np.random.default_rng(seed).permutation(len(atoms))
    return atoms[perm], perm


def translated(atoms: Atoms, shift: np.ndarray) -> Atoms:
    """Copy of ``atoms`` shifted rigidly by ``shift`` (Å), not wrapped."""
    a = atoms.copy()
    a.positions = a.positions + np.asarray(shift)
    return a


class LocalFileServer:
    """A stdlib HTTP server on 127.0.0.1 (free port) serving in-memory files, for download tests and mirrors.

    ``files`` maps URL paths (no leading slash) to bytes; ``requests`` logs the paths asked for; a path in
    ``truncate`` gets its full Content-Length announced but only half its body (an interrupted download).
    ``url`` is the base URL to pass as ``base_url`` / ``$MLCALC_PRETRAINED_URL``. Use as a context manager or call
    ``close()``.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[str] = []
        self.truncate: set[str] = set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.lstrip("/")
                owner.requests.append(path)
                body = owner.files.get(path)
                if body is None:
                    self.send_error(404, "not found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in owner.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LocalFileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveTensorPeak:
    """Context manager measuring the peak bytes of live torch tensor storages created inside it (CPU or GPU).

    Every storage an operator returns is counted until it is freed (``weakref.finalize``), so the peak is the
    allocator-independent high-water mark of what the code holds at once, forward and backward pass included (the
    autograd engine runs CPU backward ops on the calling thread, under this mode). Storages that existed before
    (weights, inputs) and views are not counted. Use: ``with LiveTensorPeak() as p: ...; p.peak`` (bytes).
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, out: object) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t._is_view():  # a view's storage is its base's
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def __enter__(self) -> LiveTensorPeak:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
