"""``python -m step37_deploy.cli``: the same as the ``step37-deploy`` entry point."""

import sys

from . import main

sys.exit(main())
