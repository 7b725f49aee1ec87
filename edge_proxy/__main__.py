import sys

from edge_proxy.cli import main

sys.exit(main())
