"""`python -m cli` runs the `screening` command."""

import sys

from cli.main import main

sys.exit(main())
