import sys

from rocketkv.harness.report.cli import main

sys.exit(main())
