"""Calibration prompt pools: the pool shipped with slimexport, and user files (one prompt per line).

The shipped pool (``slimexport/data/prompt_pool.tsv``) has one ``tag<TAB>prompt`` per line; tags are
``low_f`` (smooth, flat, low-detail scenes) and ``high_f`` (texture- and detail-heavy scenes). It was written
for slimexport (``tools/make_prompt_pool.py``) and holds no captions from any dataset.
"""

from __future__ import annotations

import codecs
from importlib import resources
from pathlib import Path

from slimexport.errors import UsageError

MAX_PROMPT_CHARS = 2000


def shipped_pool() -> tuple[list[str], list[str]]:
    """``(prompts, tags)`` of the pool shipped with slimexport."""
    text = (resources.files("slimexport") / "data" / "prompt_pool.tsv").read_text(encoding="utf-8")
    prompts, tags = [], []
    for line in text.splitlines():
        if line.strip():
            tag, _, prompt = line.partition("\t")
            prompts.append(prompt.strip())
            tags.append(tag.strip())
    return prompts, tags


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines and ``#`` comments skipped), de-duplicated in order.

    Raises:
        UsageError: missing, unreadable, binary or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompts file {p} {'is a folder' if p.is_dir() else 'does not exist'}",
                         "pass a text file with one prompt per line to --prompts")
    try:
        data = p.read_bytes()
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as err:
        at = err.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)  # an offset into the file
        raise UsageError(f"prompts file {p} is not UTF-8 text (byte {at})", "pass a text file with one prompt per line") from err
    except OSError as err:
        raise UsageError(f"cannot read prompts file {p} ({err.strerror})", "check its permissions") from err
    seen, out = set(), []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s in seen:
            continue
        if len(s) > MAX_PROMPT_CHARS:
            raise UsageError(f"prompts file {p} has a line of {len(s)} characters", f"keep prompts under {MAX_PROMPT_CHARS} characters")
        seen.add(s)
        out.append(s)
    if not out:
        raise UsageError(f"prompts file {p} has no prompts", "write one prompt per line (lines starting with # are comments)")
    return out
