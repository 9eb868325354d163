"""Auditing a task folder: `fingerprints`, `hamming` and `duplicates` (near-duplicate photos),
`checks` (`replicate audit`) and `cleaning` (`replicate clean`: logged, undoable moves)."""
