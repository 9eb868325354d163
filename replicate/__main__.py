"""`python -m replicate`, the same as the `replicate` command (and what `accelerate launch -m replicate` runs)."""

from .cli import main

main()
