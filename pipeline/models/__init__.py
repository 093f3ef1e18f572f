"""Layer 3 of 5: models and their maths: open_clip loading and identity, text encoders, temporal modules,
classifier heads (and how heads are made: LDA, prototypes, random, orthogonal), CoOp, losses. Imports core."""
