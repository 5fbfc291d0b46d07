"""``python -m jobs`` is the same as ``imgfeat``."""

import sys

from jobs.cli import main

sys.exit(main())
