"""The shared core every stage imports: files written safely (fs), output folders (outdir), the config and
flag system (config), the dataset schema, registries, one-line user errors, progress, trackers, model cards.
It imports no stage."""
