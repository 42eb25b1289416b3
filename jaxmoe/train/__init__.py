"""Training: state, optimizer, pure step functions and the loop."""
