"""Stage cache: each stage's artifacts are keyed by a content hash of its inputs and recorded in a manifest.

A stage is *cached* when the manifest records the same key and every recorded file still has its sha256.
The manifest is rewritten (atomically) only after a stage's artifacts are complete, so a build killed in the
middle of a stage reruns that stage and nothing before it. Paths in the manifest are relative and must
resolve inside the output folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from slimexport._version import __version__
from slimexport.artifacts import check_inside, read_json, sha256_file, sha256_json, write_json
from slimexport.errors import ArtifactError, IncompatibleArtifactError

log = logging.getLogger("slimexport")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "slimexport.manifest/1"


def stage_key(*parts) -> str:
    """Content hash of a stage's inputs (configs, upstream keys, versions)."""
    return sha256_json([__version__, *parts])


class Manifest:
    """``manifest.json`` of an output folder: stage records plus free-form sections (model, io, results)."""

    def __init__(self, root: str | Path, identity: dict | None = None):
        self.root = Path(root).resolve()
        self.path = self.root / MANIFEST
        self.data: dict = {"format": MANIFEST_FORMAT, "slimexport_version": __version__, "stages": {}}
        if self.path.exists():
            try:
                old = read_json(self.path, "manifest")
            except ArtifactError:
                old = None  # a corrupted manifest is not trusted: every stage reruns
            if isinstance(old, dict):  # valid JSON of another shape ([], a number) is as corrupted
                self._adopt(old, identity)
        if identity is not None:
            self.data["identity"] = identity

    def _adopt(self, old: dict, identity: dict | None) -> None:
        if old.get("format") != MANIFEST_FORMAT:
            raise IncompatibleArtifactError(
                f"{self.path} has format {old.get('format')!r}; this slimexport reads {MANIFEST_FORMAT!r}",
                "pass a new --out folder or delete the old one",
            )
        if old.get("slimexport_version") != __version__:
            raise IncompatibleArtifactError(
                f"{self.root} was built by slimexport {old.get('slimexport_version')}, this is {__version__}",
                "pass a new --out folder or delete the old one to rebuild",
            )
        if identity is not None and old.get("identity") not in (None, identity):
            prev = old["identity"]
            diff = sorted(k for k in set(identity) | set(prev) if identity.get(k) != prev.get(k))
            what = ", ".join(f"{k}: {prev.get(k)!r} there, {identity.get(k)!r} asked" for k in diff)
            raise IncompatibleArtifactError(
                f"{self.root} holds a build of another {'/'.join(diff)} ({what})",
                "pass a new --out folder, or delete the old one",
            )
        self.data = old

    def cached(self, stage: str, key: str) -> bool:
        rec = self.data["stages"].get(stage)
        if not rec or rec.get("key") != key:
            return False
        bad = self.altered(stage)
        if bad:
            log.warning("[%s] %s is %s: rebuilding the stage", stage, bad[0][0], bad[0][1])
            return False
        return True

    def altered(self, stage: str) -> list[tuple[str, str]]:
        """``(path, "missing" | "altered")`` for each recorded file of ``stage`` that no longer matches."""
        out = []
        for rel, digest in self.data["stages"].get(stage, {}).get("files", {}).items():
            p = check_inside(self.root, rel)
            if not p.exists():
                out.append((rel, "missing"))
            elif sha256_file(p) != digest:
                out.append((rel, "altered (sha256 differs from the manifest)"))
        return out

    def record(self, stage: str, key: str, files: list[str | Path], seconds: float, **extra) -> None:
        """Record a finished stage; ``files`` are paths (absolute or relative to the working directory) inside the root."""
        digests = {}
        for f in files:
            rel = os.path.relpath(Path(f).resolve(), self.root)
            check_inside(self.root, rel)
            full = self.root / rel
            if full.is_dir():
                for sub in sorted(full.rglob("*")):
                    if sub.is_file():
                        digests[os.path.relpath(sub, self.root)] = sha256_file(sub)
            else:
                digests[rel] = sha256_file(full)
        self.data["stages"][stage] = {"key": key, "files": digests, "seconds": round(seconds, 3),
                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        self.save()

    def invalidate(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            self.save()

    def stage(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def set(self, section: str, value) -> None:
        self.data[section] = value

    def save(self) -> None:
        write_json(self.path, self.data)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dst.exists():
            dst.unlink()
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def share_dir(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of folder ``src`` by hard links (atomic: built beside, then renamed)."""
    from slimexport.artifacts import atomic_dir

    with atomic_dir(dst) as tmp:
        for f in src.rglob("*"):
            if f.is_file():
                link_or_copy(f, tmp / f.relative_to(src))
