"""Released fairchem v1 checkpoints by name: the registry and a verified download cache.

``available()`` lists the 19 GemNet-OC, eSCN and SCN checkpoints of fairchem-core 1.10's registry
(``fairchem/core/models/pretrained_models.json``, spelled as there, e.g. ``"GemNet-OC-S2EF-OC20-All+MD"`` and
``"Gemnet-OC-IS2RE-ODAC"``), ``info(name)`` gives the facts of one (model family, training data, task, energy kind,
force kind, download URL; taken from fairchem's registry, configs and docs), and ``get_checkpoint(name)`` returns the
path of the file in the local cache, downloading it once.

Cache: ``cache_dir`` argument, else ``$MLCALC_CACHE``, else the platform's user cache directory
(``platformdirs.user_cache_dir("mlcalc")``), under ``pretrained/`` and the URL's path (so the two registry entries
whose files are both called ``gnoc_oc22_oc20_all_s2ef.pt``, from 2022_09 and 2023_05, are kept apart). A download
goes to a temporary file in the same directory and is renamed only once it is complete (byte count equal to the
server's Content-Length, a torch file, sha256 equal to the pinned one when the registry pins one); the sha256 is
recorded beside it (``<file>.sha256``) and checked on every later use, so a partial or corrupt file is never loaded.

Mirrors: ``base_url`` argument or ``$MLCALC_PRETRAINED_URL`` replaces ``https://dl.fbaipublicfiles.com/`` (the file's
path below it is kept). ``$MLCALC_OFFLINE=1`` (or ``offline=True``) never touches the network.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: the server the registry's file paths are relative to (fairchem's URLs all start with it)
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/"
#: seconds without data before a download is abandoned
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded (no network, HTTP error, truncated or corrupt body)."""


@dataclass(frozen=True)
class PretrainedCheckpoint:
    """Facts about one released checkpoint (from fairchem-core 1.10's registry, configs and docs).

    Attributes:
        name: the registry name, fairchem's spelling.
        family: mlcalc model name (``gemnet_oc``, ``escn``, ``scn``).
        path: the file's path below the base URL (``opencatalystproject/models/2023_03/s2ef/...pt``).
        data: training data (``OC20 2M``, ``OC20 All``, ``OC20 All+MD``, ``OC22``, ``OC20+OC22``, ``ODAC23``).
        task: ``S2EF`` (energy and forces, ``S2EFS`` when trained on stress too) or ``IS2RE`` (relaxed energy only).
        energy: ``adsorption`` (OC20 and ODAC: energy relative to the clean slab/framework and gas references) or
            ``total`` (OC22: DFT total energy).
        forces: ``direct`` (a force head), ``gradient`` (-dE/dx, with stress) or ``none`` (energy-only model).
        size_bytes: file size when a fairchem source states it, else None.
        sha256: the file's sha256 when published, else None (then the first download's hash is recorded and
            verified afterwards).
        notes: anything a user must know (for example non-strict max_neighbors).
        sources: where the facts come from.
    """

    name: str
    family: str
    path: str
    data: str
    task: str
    energy: str
    forces: str
    size_bytes: int | None = None
    sha256: str | None = None
    notes: str = ""
    sources: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The download URL on fairchem's server."""
        return DEFAULT_BASE_URL + self.path

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "data": self.data,
            "task": self.task,
            "energy": self.energy,
            "forces": self.forces,
            "stress": self.forces == "gradient",
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "url": self.url,
            "notes": self.notes,
        }


def _load_registry() -> dict[str, PretrainedCheckpoint]:
    text = resources.files("mlcalc").joinpath("data/pretrained.json").read_text(encoding="utf-8")
    out: dict[str, PretrainedCheckpoint] = {}
    for entry in json.loads(text)["checkpoints"]:
        entry = dict(entry)
        entry["sources"] = tuple(entry.get("sources", ()))
        ckpt = PretrainedCheckpoint(**entry)
        out[ckpt.name] = ckpt
    return out


REGISTRY: dict[str, PretrainedCheckpoint] = _load_registry()


def available() -> list[str]:
    """The registry names of every released checkpoint mlcalc can load (fairchem's spelling), in registry order."""
    return list(REGISTRY)


def lookup(name: str) -> PretrainedCheckpoint | None:
    """The registry entry for ``name`` (exact, else case-insensitive), or None when it is not a registry name."""
    if name in REGISTRY:
        return REGISTRY[name]
    folded = {k.lower(): v for k, v in REGISTRY.items()}
    return folded.get(name.lower())


def info(name: str) -> PretrainedCheckpoint:
    """The facts of one released checkpoint. Raises KeyError naming close registry names when ``name`` is unknown."""
    entry = lookup(name)
    if entry is None:
        raise KeyError(_unknown_name_message(name))
    return entry


def _unknown_name_message(name: str) -> str:
    names = available()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=3, cutoff=0.5)
        close = [n for n in names if n.lower() in close]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{name!r} is not a released checkpoint name{hint} (mlcalc.pretrained.available() lists all {len(names)})"


def default_cache_dir() -> Path:
    """``$MLCALC_CACHE`` when set, else the platform's user cache directory for mlcalc."""
    env = os.environ.get("MLCALC_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mlcalc"))


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the file of ``name`` is (or would be) cached; nothing is downloaded."""
    entry = info(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "pretrained" / Path(*entry.path.split("/"))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_torch_file(head: bytes) -> bool:
    """torch.save's zip container, or the legacy pickle format (protocol 2 header)."""
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02")


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("MLCALC_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


#: files verified in this process: path -> (size, mtime_ns) at verification (a changed file is hashed again)
_VERIFIED: dict[Path, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _verify_cached(entry: PretrainedCheckpoint, path: Path) -> bool:
    """True when the cached file matches its recorded (or pinned) sha256; a mismatch is logged and removed."""
    if _VERIFIED.get(path) == _stamp(path):
        return True
    ok = _verify_cached_file(entry, path)
    if ok:
        _VERIFIED[path] = _stamp(path)
    else:
        _VERIFIED.pop(path, None)
    return ok


def _verify_cached_file(entry: PretrainedCheckpoint, path: Path) -> bool:
    record = path.with_name(path.name + ".sha256")
    expected = entry.sha256
    if expected is None and record.exists():
        expected = record.read_text(encoding="ascii").split()[0].strip() or None
    actual = _sha256_of(path)
    if expected is None:
        # placed by hand (no record yet): accept it if it is a torch file, record its hash for later checks
        with open(path, "rb") as fh:
            if not _looks_like_torch_file(fh.read(4)):
                logger.warning("cached %s is not a torch file; removing it", path)
                path.unlink(missing_ok=True)
                return False
        _write_atomic(record, f"{actual}  {path.name}\n".encode("ascii"))
        return True
    if actual != expected:
        logger.warning("cached %s has sha256 %s, expected %s; removing it and downloading again",
                       path, actual, expected)
        path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        return False
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(entry: PretrainedCheckpoint, url: str, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    tmp = Path(tmp_name)
    manual = (
        f"download it by other means and place it at {path} (or pass a mirror with base_url= / "
        f"$MLCALC_PRETRAINED_URL)"
    )
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mlcalc"})
        try:
            response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            raise DownloadError(f"{entry.name}: {url} answered HTTP {err.code} {err.reason}; {manual}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise DownloadError(f"{entry.name}: cannot reach {url} ({reason}); {manual}") from err
        h = hashlib.sha256()
        received = 0
        with response, os.fdopen(fd, "wb") as fh:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else entry.size_bytes
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.filename,
                disable=None if progress else True, leave=False,
            ) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, ValueError) as err:
                        raise DownloadError(f"{entry.name}: download from {url} broke off after {received} bytes "
                                            f"({err}); nothing was cached; {manual}") from err
                    if not chunk:
                        break
                    fh.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if length is not None and length.isdigit() and received != int(length):
            raise DownloadError(
                f"{entry.name}: download from {url} is incomplete ({received} of {length} bytes); nothing was cached"
            )
        with open(tmp, "rb") as fh:
            head = fh.read(4)
        if not _looks_like_torch_file(head):
            raise DownloadError(
                f"{entry.name}: {url} did not return a torch checkpoint (first bytes {head!r}; an error page?); "
                f"nothing was cached; {manual}"
            )
        digest = h.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise DownloadError(
                f"{entry.name}: {url} gave sha256 {digest}, expected {entry.sha256}; nothing was cached"
            )
        os.replace(tmp, path)
        _write_atomic(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode("ascii"))
        logger.info("downloaded %s (%d bytes, sha256 %s) to %s", entry.name, received, digest, path)
    finally:
        tmp.unlink(missing_ok=True)


def get_checkpoint(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> Path:
    """The local path of the released checkpoint ``name``, downloaded into the cache on first use.

    Args:
        name: a registry name (``available()``; case-insensitive match accepted).
        cache_dir: cache root (default ``default_cache_dir()``).
        base_url: mirror replacing ``https://dl.fbaipublicfiles.com/`` (default ``$MLCALC_PRETRAINED_URL``).
        offline: never download (default: ``$MLCALC_OFFLINE``); a missing file then raises.
        progress: show a progress bar (tqdm, only on a terminal).

    Returns:
        Path of the verified checkpoint file.

    Raises:
        KeyError: unknown name (the message suggests close names).
        DownloadError: offline and not cached, no network, an HTTP error, a truncated body, a non-torch body or a
            sha256 mismatch; the message names the URL and where to place a manually downloaded file.
    """
    entry = info(name)
    path = cached_path(entry.name, cache_dir)
    if path.exists() and _verify_cached(entry, path):
        return path
    base = base_url if base_url is not None else os.environ.get("MLCALC_PRETRAINED_URL") or DEFAULT_BASE_URL
    url = base.rstrip("/") + "/" + entry.path
    if _offline(offline):
        raise DownloadError(
            f"{entry.name} is not cached at {path} and downloads are off (offline / $MLCALC_OFFLINE); "
            f"download {url} and place it there"
        )
    logger.info("downloading %s from %s", entry.name, url)
    _download(entry, url, path, progress)
    return path


def resolve(checkpoint: str | os.PathLike, progress: bool = True) -> tuple[Path, PretrainedCheckpoint | None]:
    """A checkpoint argument as a file path: an existing file as given, a registry name through the cache.

    Returns (path, registry entry or None). Raises FileNotFoundError for a missing file that is not a registry name
    (naming close registry names when the argument looks like one), and what ``get_checkpoint`` raises.
    """
    text = os.fspath(checkpoint)
    if os.path.exists(text):
        return Path(text), None
    entry = lookup(text) if isinstance(checkpoint, str) else None
    if entry is not None:
        return get_checkpoint(entry.name, progress=progress), entry
    looks_like_name = "/" not in text and os.sep not in text and not text.endswith((".pt", ".pth", ".ckpt"))
    if looks_like_name:
        raise FileNotFoundError(f"no checkpoint file {text!r}, and {_unknown_name_message(text)}")
    raise FileNotFoundError(f"checkpoint file not found: {text}")
