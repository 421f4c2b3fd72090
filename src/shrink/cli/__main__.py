"""`python -m shrink.cli`: the same program as `shrink`."""

import sys

from . import main

sys.exit(main())
