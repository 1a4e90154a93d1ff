"""The HTTP API (FastAPI): thin routers over ``nirvana.service.service.JobService``."""
