"""`python -m ml_backend.cli`: the same as `amls`."""

import sys

from ml_backend.cli import main

sys.exit(main())
