"""`python -m agent` runs the host agent, like `driftwatch-agent`."""

import sys

from agent.daemon import main

sys.exit(main())
