"""Storage backends of the quota windows."""
