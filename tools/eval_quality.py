"""Quality harness (issue 4): SlimDiff against its baselines on the shipped ``digits`` model.

    python tools/eval_quality.py                           # everything, default settings
    python tools/eval_quality.py --sample-rows target      # FD / accuracy on the dense and budget-0.73 rows only
    python tools/eval_quality.py --help                    # every option

A command line over :mod:`slimexport.harness.eval_quality` (rows, metrics and the report are described there);
results go to docs/quality and the compressed models to engines/quality of this checkout by default.
"""

import sys
from pathlib import Path

from slimexport.harness.eval_quality import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parents[1]))
