"""Database systems behind one interface (`base.DatabaseAdapter`), found by type name in `registry.DATABASE_TYPES`:
`postgres` (asyncpg), `mysql` (asyncmy), `sqlite` (aiosqlite), and `pool`, a bounded pool for drivers without one."""
