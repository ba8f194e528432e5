"""Neural network modules (pure torch)."""
