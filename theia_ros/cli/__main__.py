"""`python -m theia_ros.cli`: the theia-ros command."""
import sys

from theia_ros.cli.main import main

sys.exit(main())
