"""``python -m nirvana.cli``: the same command line as the ``nirvana`` script."""

from nirvana.cli import main

main()
