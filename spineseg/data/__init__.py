"""Data: sources -> samples -> working-resolution arrays -> DataModule."""
