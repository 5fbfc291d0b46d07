"""``python -m imgfeat.cli`` is the same as ``imgfeat``."""

import sys

from imgfeat.cli.main import main

sys.exit(main())
