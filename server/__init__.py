"""What the coordinator runs: the Flower ServerApp and run records."""
