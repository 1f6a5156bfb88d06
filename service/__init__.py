"""service: the FastAPI inference service of M2."""
