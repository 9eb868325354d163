"""`replicate index`: `build` (the command), `plan` (what to tag, the rows), `cluster` (on Ray) and
`store` (Parquet parts committed atomically)."""
