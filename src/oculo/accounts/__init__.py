"""Accounts: API keys, the usage ledger and rate limits.

- `schema`   the tables (one source of truth; the migrations create exactly these)
- `store`    the database: URL resolution (SQLite in a data folder, or PostgreSQL), the async
             engine, Alembic migrations applied at start
- `keys`     key format, hashing, lookup by public id, constant-time comparison; the key store
- `ledger`   one durable row per request that reached an engine; totals by day and model
- `limits`   per-key requests and tokens per minute: in memory, or in Redis for a fleet

Nothing here knows HTTP: the API layer (`oculo.api.auth`, `oculo.api.ratelimit`,
`oculo.api.usage`) turns these into status codes through `oculo.errors`.
"""
