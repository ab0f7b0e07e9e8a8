"""MP-100 on disk and as tensors: the catalog (torch-free: categories, instances, splits), episodes, run choices,
crop geometry, instance crops, transforms, batches, the episodes of a run by mode, and the synthetic generator."""
