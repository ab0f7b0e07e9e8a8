"""One router per resource: jobs, their events, their artifacts, checkpoints and predictions, categories, health, the
page."""
