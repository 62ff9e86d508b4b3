"""``python -m imgcls ...`` (and ``torchrun ... -m imgcls train ...``): the same as the ``imgcls`` command."""

import sys

from .cli import main

sys.exit(main())
