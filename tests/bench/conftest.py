"""The benchmark's smoke test is a long run: collected only with DRIFTWATCH_LONG=1."""

import os

collect_ignore = [] if os.environ.get("DRIFTWATCH_LONG", "") in ("1", "true", "yes") \
    else ["test_bench9_smoke.py"]
