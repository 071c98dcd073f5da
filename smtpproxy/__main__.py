"""``python -m smtpproxy``."""

import sys

from smtpproxy.cli import main

sys.exit(main())
