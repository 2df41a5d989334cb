"""What every other room uses: the budget format, grading, metrics, stage configuration, model loading,
user errors and process settings. Nothing here imports another room."""
