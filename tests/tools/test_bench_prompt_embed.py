"""tools/bench_prompt_embed.py on ``tiny``: both encodings of the pool agree and both are timed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prompt_embed_tiny():
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "bench_prompt_embed.py"), "--model", "tiny",
                        "--prompts", "100"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["prompts"] == 100 and row["full_77_tokens_s"] > 0 and row["embed_prompts_s"] > 0
    assert row["max_abs_diff"] < 1e-4 * max(row["max_abs"], 1.0)
