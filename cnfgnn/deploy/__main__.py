"""``python -m cnfgnn.deploy demo|run ...`` (the same as ``cnfgnn-deploy``)."""

import sys

from cnfgnn.deploy.cli import main

sys.exit(main())
