"""`python -m amls_cli`: the same as `amls`."""

import sys

from amls_cli import main

sys.exit(main())
