import sys

from opd.cli.main import main

sys.exit(main())
