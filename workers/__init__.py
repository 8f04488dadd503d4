"""The worker service: inner training loop, pseudo-gradient, upload, announce."""
