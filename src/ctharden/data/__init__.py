"""Data: ingestion of LIDC-IDRI, COVID-CT and synthetic phantoms; the dataset format; validation."""
