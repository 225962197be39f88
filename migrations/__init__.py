"""Alembic migrations for wanbatch's schema, shipped inside the package (see ``jobs.db.migrate``)."""
