"""Cross-cutting infrastructure shared by every module (no module imports here)."""
