"""`python -m branchmerge_operator` is the `branchmerge` command."""

import sys

from branchmerge_operator.cli import main

sys.exit(main())
