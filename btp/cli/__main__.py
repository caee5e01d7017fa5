"""`python -m btp.cli` = `btp`."""
from btp.cli import main

main()
