"""`python -m sparse_opd.cli`: the same as the `sparse-opd` command."""

import sys

from . import main

sys.exit(main())
