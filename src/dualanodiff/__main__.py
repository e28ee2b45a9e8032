"""`python -m dualanodiff` (and `accelerate launch -m dualanodiff train ...`) runs the command line."""

from dualanodiff.cli import main

main()
