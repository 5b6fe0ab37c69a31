"""`python -m probes.cli STAGE ...` (used by torchrun, which needs a module to launch)."""

import sys

from probes.cli.main import main

sys.exit(main())
