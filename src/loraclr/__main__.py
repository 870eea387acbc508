import sys

from loraclr.cli import main

sys.exit(main())
