"""Ready models and command-line jobs built on lipnets' public API only."""
