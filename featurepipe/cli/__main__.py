"""`python -m featurepipe.cli`: the same as the `featurepipe` command."""

from featurepipe.cli.app import main

main()
