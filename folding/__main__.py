import sys

from folding.cli import main

sys.exit(main())
