import sys

from userembed.commands.main import main

sys.exit(main())
