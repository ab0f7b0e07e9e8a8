"""The training-job web service. Imports only the torch-free parts of cape: the API must start fast."""
