"""Photos into task folders: `sources` (`replicate data houses`, `replicate prepare`)."""
