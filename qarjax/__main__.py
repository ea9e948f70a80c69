"""`python -m qarjax` is the `qarjax` command."""

import sys

from qarjax.cli import main

sys.exit(main())
