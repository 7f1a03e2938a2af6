"""Model definitions whose parameter names follow the original checkpoint layouts."""
