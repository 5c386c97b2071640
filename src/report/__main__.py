"""`python -m convergent.report` = `convergent-report`."""

import sys

from convergent.report.cli import main

sys.exit(main())
