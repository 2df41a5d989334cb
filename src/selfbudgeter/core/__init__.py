"""What every other room uses: the budget format, grading, metrics, stage configuration, model loading,
user errors and process settings. Only `models` reaches another room: it finds the shipped embedded model's
folder (`embedded.model.BASE_MODEL_DIR`)."""
