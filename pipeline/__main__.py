"""``python -m imgfeat`` is the same as the ``imgfeat`` command."""

import sys

from imgfeat.cli.main import main

sys.exit(main())
