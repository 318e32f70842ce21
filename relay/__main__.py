import sys

from relay.tools.cli import main

sys.exit(main())
