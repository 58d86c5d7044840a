"""Everything that changes weights after pruning: super-network training (sandwich samplers),
distillation, closed-form repair, block-local distillation, block scores and the refine recipe."""
