"""Alembic migrations for the accounts tables, applied by `oculo.accounts.store.migrate`."""
