#!/usr/bin/env python
"""Entry point: parse the command line and hand over to xml_plugin (see ``python run.py --help``)."""
import sys

from xml_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
