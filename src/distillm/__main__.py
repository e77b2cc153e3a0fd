import sys

from distillm.cli import main

sys.exit(main())
