"""scan_core."""
