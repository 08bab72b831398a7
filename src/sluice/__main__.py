"""``python -m sluice`` is the ``flow`` command."""

import sys

from sluice.cli import main

sys.exit(main())
