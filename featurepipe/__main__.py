"""`python -m featurepipe ...`: the same command as the `featurepipe` script."""

from featurepipe.cli.app import main

main()
