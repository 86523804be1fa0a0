"""`python -m featurepipe ...`: the same command as the `featurepipe` script."""

from featurepipe.cli import main

main()
