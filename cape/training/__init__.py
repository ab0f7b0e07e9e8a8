"""Training a CAPE model: the trainer (episodic, three modes, callbacks), its losses and the pictures of a run."""
