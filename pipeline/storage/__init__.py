"""Layer 4 of 5: the Zarr stores: the store contract (fingerprints, locks, blocks, bookkeeping, snapshots,
integrity), frame and feature stores, exports. Imports core, media and models (the feature store encodes)."""
