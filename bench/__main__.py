"""`python -m bench`: the whole benchmark suite (see bench/run_all.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run_all import main  # noqa: E402

raise SystemExit(main())
