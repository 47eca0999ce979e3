"""Celery workers: thin tasks that take job ids and call app.services."""
