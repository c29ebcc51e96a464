"""`python -m pgolf_pack.cli` runs the command line, like the `pgolf-pack` script."""

from . import main

main()
