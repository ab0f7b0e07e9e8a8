"""Development tooling: the whole stack on one machine (``make run``: embedded), and the local server processes
(redis-server, PostgreSQL, moto's S3, Celery workers, uvicorn) that it, the tests and the benchmarks start."""
