"""`replicate label`: `active` (features, head, the next batch), `rounds` (the command) and
`copies` (`--apply`: labelled photos copied in, logged)."""
