"""What runs at a hospital: the Flower ClientApp and everything that touches the site's own data."""
