"""`python -m qmpmux` is the `qmpmux` command."""

import sys

from qmpmux.cli import main

sys.exit(main())
