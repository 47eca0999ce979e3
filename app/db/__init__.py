"""Persistence: SQLAlchemy 2 models, repositories (every query), sessions, migrations."""
