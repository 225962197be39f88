"""Alembic migrations for wanbatch's schema, shipped inside the package (see ``jobs.db.migrate``).

The revisions are frozen on purpose: once released, a revision must keep doing to a database of
its day what it did then, for as long as someone may upgrade from before it. So each carries its
own code, repeated where another revision has the same, and none imports another or a helper
module of this package: a helper shared by several, edited for a later one, would silently change
what the earlier ones do. That is why the rekeying which 0022, 0024, 0034 and 0042 each do (select
the jobs whose input could be affected, recompute the former and the new key, keep a stored key
that cannot be reproduced, leave a key another job of the batch holds to that job) is written out
in each of them and deliberately not factored out. A fix is a new revision; a released one is
edited only where a database that already ran it is unaffected (as 0039's re-marking after a
downgrade was), or for formatting and type annotations (``ruff`` and ``mypy`` check this package
as any other).
"""
