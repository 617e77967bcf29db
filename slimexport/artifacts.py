"""Files between stages: atomic writes, sha256 digests, JSON and safetensors I/O.

Every artifact is written under a temporary name in its final folder and renamed into place, so a killed run
leaves either the previous file or the new one, never half of one. Folders are built in a temporary sibling
and renamed likewise. Digests go into manifests and are checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from slimexport.errors import ArtifactError, ResourceError, UsageError

TMP_PREFIX = ".tmp-"
OLD_SUFFIX = ".old"  # atomic_dir: the folder being replaced, kept until the new one is in place


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-serialisable object in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _os_error(err: OSError, path: Path) -> Exception:
    import errno

    if err.errno == errno.ENOSPC:
        return ResourceError(f"no space left on the device while writing {path}", "free disk space or pass --out on another disk")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return UsageError(f"cannot write {path} ({os.strerror(err.errno)})", "pass a writable --out folder")
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return UsageError(f"cannot create folder {path}: a file is in the way ({os.strerror(err.errno)})",
                          "pass an --out path that is a folder (or does not exist yet)")
    return err


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Refuse, without creating anything, a folder that could not be created or written: ``path`` or its first
    existing ancestor is a file, or is not writable."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create folder {p}: {probe} is a file", "pass an --out path that is a folder (or does not exist yet)")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write {probe} (permission denied)", "pass a writable --out folder")
    return p


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files and folders a killed run left under ``root`` (never trusted: only wasted disk),
    except a folder :func:`atomic_dir` was replacing when killed, with nothing in its place: that one goes back.

    Call it before a run writes into ``root``; two runs writing into one folder at once are not supported."""
    removed = []
    for p in sorted(Path(root).rglob(TMP_PREFIX + "*")):
        if any(part.startswith(TMP_PREFIX) for part in p.relative_to(root).parts[:-1]):
            continue  # inside a temporary folder removed with it
        if p.name.endswith(OLD_SUFFIX) and len(p.name) > len(TMP_PREFIX) + len(OLD_SUFFIX):
            final = p.with_name(p.name[len(TMP_PREFIX):-len(OLD_SUFFIX)])
            if not final.exists():
                os.replace(p, final)  # killed between atomic_dir's two renames: the previous folder is the good one
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error(err, p) from err
    if not os.access(p, os.W_OK):
        raise UsageError(f"cannot write {p} (permission denied)", "pass a writable --out folder")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    final = Path(path)
    ensure_dir(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(Path(tmp), False)
        os.replace(tmp, final)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error(err, final) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    final = Path(path)
    ensure_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        yield tmp
        _publish_mode(tmp, True)
        if final.exists():
            old = final.with_name(TMP_PREFIX + final.name + OLD_SUFFIX)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the previous folder goes back: nothing is lost
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(err, final) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON: NaN and ±inf (an exact match's SQNR, a metric with nothing to measure) are written as ``null``,
    since ``NaN``/``Infinity`` are not JSON and strict parsers (jq, JavaScript) reject them."""
    return write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def json_object(path: Path, what: str) -> dict | None:
    """The JSON object in ``path``; ``None`` when it is missing, unreadable or not an object."""
    try:
        data = read_json(path, what) if path.is_file() else None
    except ArtifactError:
        return None
    return data if isinstance(data, dict) else None


def write_result(path: str | os.PathLike, obj: Any) -> Any:
    """``obj`` written to ``path`` as JSON (:func:`write_json`) and returned: a stage's result and its file at once."""
    write_json(path, obj)
    return obj


def _json_safe(o):
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if hasattr(o, "to_dict"):
        return _json_safe(o.to_dict())
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy and torch scalars
        return _json_safe(o.item())
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{what} {p} is missing", "rebuild it (rerun the command that made it)")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{what} {p} is corrupted ({err.__class__.__name__}: {err})", "delete it and rerun to rebuild it") from err


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its sha256."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None, what: str = "weights", device: str = "cpu") -> dict:
    """Read a safetensors file (never a pickle), checking its digest first when one is given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{what} {p} is missing", "rebuild it (rerun the command that made it)")
    if expected_sha256 is not None:
        got = sha256_file(p)
        if got != expected_sha256:
            raise ArtifactError(
                f"{what} {p} does not match its recorded sha256 (file {got[:12]}…, recorded {expected_sha256[:12]}…): "
                "it was truncated or altered", "delete it and rerun to rebuild it",
            )
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{what} {p} is not a readable safetensors file ({err})", "delete it and rerun to rebuild it") from err


def check_inside(root: str | os.PathLike, rel: str) -> Path:
    """Resolve a manifest path; refuse absolute paths and ``..`` escapes."""
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ArtifactError(f"manifest path {rel!r} points outside its folder", "rebuild the folder; never edit manifests by hand")
    root_p = Path(root).resolve()
    p = (root_p / rel).resolve()
    if root_p != p and root_p not in p.parents:
        raise ArtifactError(f"manifest path {rel!r} resolves outside {root_p}", "rebuild the folder; never edit manifests by hand")
    return p
