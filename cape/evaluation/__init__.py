"""Evaluation: PCK and mPCK (metrics), the MP-100 protocol on a model or a checkpoint (protocol), its tables (table)."""
