"""Step-caching quality on ``digits`` (issue 19): cached sampling against the dense pipeline at 10/25/50 DDIM steps.

    python tools/eval_stepcache_quality.py --no-judge          # final-sample errors of every variant (minutes)
    python tools/eval_stepcache_quality.py --variants 3,auto   # with the judge's accuracy and FD
    python tools/eval_stepcache_quality.py --help              # every option

A command line over :mod:`slimexport.harness.stepcache_quality`; results go to docs/quality/stepcache.
"""

import sys
from pathlib import Path

from slimexport.harness.stepcache_quality import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parents[1]))
