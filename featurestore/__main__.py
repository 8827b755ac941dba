import sys

from featurestore.cli import main

sys.exit(main())
