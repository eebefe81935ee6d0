"""`python -m agent` runs the host agent, like `driftwatch-agent`."""

import sys

from agent.daemon.main import main

sys.exit(main())
