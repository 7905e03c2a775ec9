"""Process groups, CPU compatibility and collectives with tangent-aware autograd."""
