import sys

from slimexport.cli.main import main

sys.exit(main())
