#!/usr/bin/env python3
"""keygate's command line; `python manage.py --help` lists the commands."""

from api.cli import cli

if __name__ == "__main__":
    cli()
