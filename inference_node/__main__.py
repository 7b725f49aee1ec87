import sys

from inference_node.cli import main

sys.exit(main())
