import sys

from genadapter.cli import main

sys.exit(main())
