"""Using a trained model on a person's own images: the inputs checked before torch loads (inputs, torch-free: the API
imports it) and the keypoints predicted (keypoints)."""
