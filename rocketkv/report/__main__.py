import sys

from rocketkv.report.cli import main

sys.exit(main())
