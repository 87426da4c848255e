"""Training: state, optimizer, step, loop."""
