"""The CoDIR method: the objective, its pure losses, negatives (queue, memory bank), pooling, the layer map."""
