"""`python -m metagg` is the `metagg` command."""

import sys

from metagg.cli import main

sys.exit(main())
